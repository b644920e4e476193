"""Find a checkpoint: local directory -> Hugging Face cache -> download (resumable, with progress bars)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qconvert.errors import ModelNotFoundError

# What a conversion needs from a hub repo; skips .bin/.pth duplicates and other formats.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "README.md", "LICENSE*")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    repo_id: str | None  # None for a local directory given by path
    revision: str | None  # the snapshot's commit hash when it came from the hub cache


def hub_cache_dir() -> Path:
    """The cache huggingface_hub uses, read from the environment now (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _not_found(repo_id: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {repo_id!r} is not available: {why}. Looked in the Hugging Face cache at {hub_cache_dir()} "
        f"(set HF_HOME or HF_HUB_CACHE to use another). Either download it where you have network "
        f"(huggingface-cli download {repo_id}) or pass a local checkpoint directory with --model PATH."
    )


def resolve_model(model: str, *, allow_download: bool = True) -> ResolvedModel:
    """Resolve ``model`` (a local directory or a hub repo id such as ``Qwen/Qwen2.5-1.5B-Instruct``)."""
    local = Path(model).expanduser()
    if local.is_dir():
        return ResolvedModel(local.resolve(), None, None)
    if local.exists() or local.is_symlink():  # a file (or a dangling link) is a local path, never a hub id
        raise ModelNotFoundError(
            f"{model!r} is a file, not a checkpoint directory: give the directory that holds config.json and the "
            f"*.safetensors files ({local.parent.resolve() if local.parent != Path() else Path.cwd()}?).")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{model!r} is neither an existing directory nor a hub repo id like 'Qwen/Qwen2.5-1.5B-Instruct'.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        path = snapshot_download(model, cache_dir=cache, allow_patterns=list(ALLOW_PATTERNS), local_files_only=True)
        return ResolvedModel(Path(path), model, Path(path).name)
    except LocalEntryNotFoundError:
        pass
    if _offline():
        raise _not_found(model, "it is not in the cache and HF_HUB_OFFLINE is set")
    if not allow_download:
        raise _not_found(model, "it is not in the cache and downloads are disabled")
    try:
        path = snapshot_download(model, cache_dir=cache, allow_patterns=list(ALLOW_PATTERNS))
    except (OSError, ValueError) as e:  # network errors, gated/missing repos (huggingface_hub errors subclass these)
        raise _not_found(model, f"download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return ResolvedModel(Path(path), model, Path(path).name)
