"""qconvert: turn Qwen2.5 Hugging Face checkpoints into verified deployable artifacts."""

__version__ = "0.1.0"
