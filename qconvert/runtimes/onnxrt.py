"""Run a qconvert ONNX export with onnxruntime: full-sequence logits and greedy decoding with the KV cache.

The graph's contract is in ``qconvert.onnx_export.graph``: int64 ``input_ids`` / ``attention_mask`` /
``position_ids`` and one ``past_key_values.N.key/value`` pair per layer (``[batch, kv_heads, past, head_dim]``,
empty on the first call), returning float32 ``logits`` and the grown ``present.N.key/value``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qconvert.errors import QConvertError, RuntimeMissingError

MODEL_FILE = "model.onnx"
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class OnnxModel:
    """One onnxruntime session over an export directory (or its ``model.onnx``), batch 1."""

    def __init__(self, path: Path, *, device: str = "cpu", threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeMissingError("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu "
                                      "for --device cuda).") from e
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise QConvertError(f"{model} does not exist; give a directory written by `qconvert onnx` or its model.onnx.")
        kind = "cuda" if device.startswith("cuda") else device
        if kind not in PROVIDERS:
            raise QConvertError(f"unknown device {device!r}; use cpu or cuda.")
        if kind == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeMissingError("onnxruntime has no CUDAExecutionProvider here; install onnxruntime-gpu on a "
                                      "machine with an NVIDIA GPU, or use device cpu.")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model), opts, providers=PROVIDERS[kind])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = {i.name for i in self.session.get_inputs()}
        first = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_heads, self.head_dim = _kv_dims(first.shape, model.parent)
        self.kv_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        self._vocab = int(self.session.get_outputs()[0].shape[2])

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def empty_cache(self) -> dict[str, np.ndarray]:
        return {n: np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype) for n in self.past_names}

    def step(self, ids: Sequence[int] | np.ndarray, cache: dict[str, np.ndarray]
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``ids`` after the cached tokens: logits f32 [len(ids), vocab] and the grown cache."""
        past = next(iter(cache.values())).shape[2] if cache else 0
        t = len(ids)
        feeds = {"input_ids": np.asarray(ids, np.int64)[None],
                 "attention_mask": np.ones((1, past + t), np.int64),
                 "position_ids": np.arange(past, past + t, dtype=np.int64)[None], **cache}
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}  # other exporters may omit position_ids
        out = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        new = {n: out[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return out["logits"][0].astype(np.float32), new

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 [len(ids), vocab] for one full sequence, empty KV cache."""
        return self.step(ids, self.empty_cache())[0]

    def greedy(self, ids: Sequence[int], n_new: int) -> list[int]:
        """``n_new`` greedy tokens after ``ids``: one prefill, then one cached step per token."""
        logits, cache = self.step(ids, self.empty_cache())
        out: list[int] = []
        for _ in range(n_new):
            out.append(int(np.argmax(logits[-1])))
            if len(out) == n_new:
                break
            logits, cache = self.step([out[-1]], cache)
        return out


def _kv_dims(shape: Sequence[int | str | None], directory: Path) -> tuple[int, int]:
    """(kv heads, head dim) of a past input; symbolic dims (other exporters) come from genai_config.json."""
    if isinstance(shape[1], int) and isinstance(shape[3], int):
        return int(shape[1]), int(shape[3])
    import json

    cfg = directory / "genai_config.json"
    if not cfg.is_file():
        raise QConvertError(f"{directory}: the KV cache shape {list(shape)} is symbolic and there is no "
                            "genai_config.json to read the head counts from.")
    decoder = json.loads(cfg.read_text())["model"]["decoder"]
    return int(decoder["num_key_value_heads"]), int(decoder["head_size"])
