"""The reference pass: the float checkpoint over the evaluation windows, summarized once and cached.

The reference runs through qconvert's streaming layer-by-layer driver (``qconvert.calibration.streamed_logits``:
its Qwen2 forward, tested equal to transformers' within 1e-4), so its peak memory is one decoder layer plus the
windows' hidden states, whatever the model size: a 72B reference runs on a 24 GiB CPU machine.

Method (one, always): the token ids are cut into consecutive non-overlapping windows of ``ctx`` tokens; every
window is run from an empty cache, and positions ``ctx // 2 .. ctx - 2`` are scored (each predicts the next
token of the window with at least ``ctx / 2`` tokens of context), as llama-perplexity does. A window of 1024
scores 511 positions. The reference keeps only what the comparison needs (``metrics.TopK`` plus the log-prob of
each true next token), so N artifacts cost one reference pass; the summary is stored on disk under a key made
of the reference's files, the token sha256, ``ctx``, the window count and the compute device/dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.errors import QConvertError
from qconvert.verify import metrics
from qconvert.verify.tokens import EvalTextError, EvalTokens

if TYPE_CHECKING:
    import torch

CACHE_VERSION = "qconvert-verify-ref-v4"  # v4: streamed qconvert forward (v3: transformers)
MIN_CTX = 8
TOPK_FIELDS = tuple(f.name for f in dataclasses.fields(metrics.TopK))


class VerifyError(QConvertError):
    """Verification cannot run as asked (context, device, artifact kind, mismatched tokenizer ...)."""


@dataclass
class Reference:
    """The reference's summary over ``windows`` int32 [n_windows, ctx]; scored positions ``first .. ctx - 2``."""

    reference_dir: Path
    tokens_sha256: str
    source: str
    ctx: int
    windows: np.ndarray
    topk: metrics.TopK  # arrays [n_windows * n_scored, ...], window-major
    target_logp: np.ndarray  # float64 [n_windows * n_scored]
    n_vocab: int
    n_params: int
    device: str
    dtype: str
    tokens_per_s: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def first(self) -> int:
        return self.ctx // 2

    @property
    def n_scored(self) -> int:
        """Scored positions per window."""
        return self.ctx - 1 - self.first

    @property
    def ppl(self) -> float:
        return math.exp(-float(self.target_logp.mean()))

    def targets(self, w: int) -> np.ndarray:
        """True next tokens int64 [n_scored] of window ``w``."""
        return self.windows[w, self.first + 1:].astype(np.int64)

    def subset(self, n_windows: int) -> Reference:
        """The same reference restricted to its first ``n_windows`` windows (what ``chunks=n_windows`` computes)."""
        k = min(n_windows, len(self.windows))
        rows = slice(0, k * self.n_scored)
        return dataclasses.replace(self, windows=self.windows[:k], target_logp=self.target_logp[rows],
                                   topk=metrics.TopK(*(getattr(self.topk, f)[rows] for f in TOPK_FIELDS)))

    def window_topk(self, w: int) -> metrics.TopK:
        s = slice(w * self.n_scored, (w + 1) * self.n_scored)
        return metrics.TopK(*(getattr(self.topk, f)[s] for f in TOPK_FIELDS))


def make_windows(tokens: EvalTokens, ctx: int, chunks: int | None) -> np.ndarray:
    """int32 [n, ctx]: consecutive windows of the ids (the tail that does not fill a window is dropped)."""
    if ctx < MIN_CTX:
        raise VerifyError(f"--ctx {ctx} is too small; use at least {MIN_CTX} (512 or 1024 are usual).")
    n = tokens.n_tokens // ctx
    if n == 0:
        raise EvalTextError(f"the evaluation text ({tokens.source}) has {tokens.n_tokens} tokens, fewer than one "
                            f"window of --ctx {ctx}. Give a longer text (--text FILE) or a smaller --ctx.")
    if chunks is not None:
        if chunks < 1:
            raise VerifyError(f"--chunks {chunks}: give at least 1 window.")
        n = min(n, chunks)
    return tokens.ids[: n * ctx].reshape(n, ctx).astype(np.int32)


def read_config(model_dir: Path) -> dict[str, Any]:
    from qconvert.registry import read_model_config

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise VerifyError(f"{model_dir} has no config.json; --reference must be a Hugging Face checkpoint directory "
                          "(or a hub id / --size that resolves to one).")
    return read_model_config(model_dir)


def check_ctx(config: dict[str, Any], ctx: int, what: str) -> None:
    limit = int(config.get("max_position_embeddings") or 0)
    if limit and ctx > limit:
        raise VerifyError(f"--ctx {ctx} is longer than {what} supports ({limit} positions, max_position_embeddings); "
                          f"use --ctx {min(limit, 1024)} or less.")


def resolve_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VerifyError(f"--device {device} was asked for but torch sees no CUDA GPU (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda}). Run with --device cpu, or on a machine with an NVIDIA "
                          "GPU and a CUDA build of torch.")
    if device != "cpu" and not device.startswith("cuda"):
        raise VerifyError(f"unknown device {device!r}; use cpu, cuda or cuda:N.")
    return device


def reference_dtype(device: str, dtype: str | None) -> torch.dtype:
    """float32 on the CPU, bfloat16 on CUDA (Qwen2's activations can overflow float16), unless asked otherwise."""
    import torch

    name = dtype or ("float32" if device == "cpu" else "bfloat16")
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise VerifyError(f"reference dtype {name!r}: use float32, bfloat16 or float16.")
    return table[name]


def fingerprint(model_dir: Path) -> str:
    """sha256 over config, tokenizer, and each weight file's name, size, mtime and safetensors header (not the data)."""
    h = hashlib.sha256()
    model_dir = Path(model_dir)
    for name in ("config.json", "tokenizer.json"):
        p = model_dir / name
        h.update(name.encode() + (p.read_bytes() if p.is_file() else b"-"))
    for p in sorted(model_dir.glob("*.safetensors")):
        st = p.stat()
        with p.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = f.read(min(n, 1 << 26))
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode() + header)
    return h.hexdigest()


def count_params(model_dir: Path) -> int:
    from qconvert.io.safetensors import SafetensorsCheckpoint

    return sum(int(np.prod(e.shape)) for e in SafetensorsCheckpoint(Path(model_dir)).entries.values())


def default_cache_dir() -> Path:
    from qconvert.paths import verify_cache_dir

    return verify_cache_dir()


def reference_windows(reference_dir: Path, windows: np.ndarray, first: int, device: str, dtype: Any,
                      progress: str | None = None) -> Iterator[Any]:
    """Float32 logits [ctx - 1 - first, vocab] per window, streamed layer by layer (one layer in memory).

    The windows run 4 at a time through each layer (the MLP's [4, ctx, intermediate] activations are the
    largest temporary), then the head one window at a time.
    """
    import torch

    from qconvert.calibration.driver import CalibrationSettings, read_config, streamed_logits
    from qconvert.io.safetensors import SafetensorsCheckpoint

    settings = CalibrationSettings(device, dtype, 4)
    ids = torch.from_numpy(windows.astype(np.int64))
    return streamed_logits(SafetensorsCheckpoint(Path(reference_dir)), read_config(Path(reference_dir)), ids, first,
                           settings, progress=progress)


def _cache_key(reference_dir: Path, tokens: EvalTokens, ctx: int, n_windows: int, device: str, dtype: str) -> str:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    raw = json.dumps([CACHE_VERSION, fingerprint(reference_dir), tokens.sha256, ctx, n_windows, kind, dtype,
                      metrics.TOP_K, metrics.TAIL_SAMPLES, metrics.SEED])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _save(ref: Reference, path: Path) -> None:
    meta = {k: getattr(ref, k) for k in ("tokens_sha256", "source", "ctx", "n_vocab", "n_params", "device", "dtype",
                                         "tokens_per_s")} | {"meta": ref.meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npz")
    np.savez(tmp, windows=ref.windows, target_logp=ref.target_logp, meta=np.array(json.dumps(meta)),
             **{f: getattr(ref.topk, f) for f in TOPK_FIELDS})
    tmp.replace(path)


def _load(path: Path, reference_dir: Path) -> Reference:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        extra = meta.pop("meta")
        return Reference(Path(reference_dir), windows=z["windows"], topk=metrics.TopK(*(z[f] for f in TOPK_FIELDS)),
                         target_logp=z["target_logp"], meta=extra | {"cache": str(path)}, **meta)


def build_reference(reference_dir: Path, tokens: EvalTokens, *, ctx: int = 512, chunks: int | None = None,
                    device: str = "cpu", cache_dir: Path | None = None, dtype: str | None = None,
                    progress: bool = True) -> Reference:
    """Run the reference over the windows once (or load that run from the cache) and keep its top-K summary."""
    import torch

    from qconvert.io.safetensors import SafetensorsCheckpoint

    reference_dir = Path(reference_dir)
    config = read_config(reference_dir)
    SafetensorsCheckpoint(reference_dir)  # qconvert's reader validates the weights first (no pickle, no FIFO)
    check_ctx(config, ctx, f"the reference {reference_dir.name}")
    device = resolve_device(device)
    tdtype = reference_dtype(device, dtype)
    dtype_name = str(tdtype).removeprefix("torch.")
    windows = make_windows(tokens, ctx, chunks)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"ref-{_cache_key(reference_dir, tokens, ctx, len(windows), device, dtype_name)}.npz"
    if path.is_file():
        return _load(path, reference_dir)
    first = ctx // 2
    parts, targets = [], []
    cpu_vs_cuda: dict[str, float] = {}
    start = time.perf_counter()
    for w, logits in enumerate(reference_windows(reference_dir, windows, first, device, tdtype,
                                                 "reference" if progress else None)):
        tgt = torch.from_numpy(windows[w, first + 1:].astype(np.int64)).to(logits.device)
        parts.append(metrics.summarize(logits))
        targets.append(metrics.target_logprob(logits, tgt))
        if w == 0 and device.startswith("cuda"):
            cpu_vs_cuda = _cpu_difference(reference_dir, windows[:1], first, logits)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    topk = metrics.TopK(*(np.concatenate([getattr(p, f) for p in parts]) for f in TOPK_FIELDS))
    ref = Reference(reference_dir, tokens.sha256, tokens.source, ctx, windows, topk, np.concatenate(targets),
                    int(config["vocab_size"]), count_params(reference_dir), device, dtype_name,
                    windows.size / max(seconds, 1e-9), {"cpu_vs_cuda": cpu_vs_cuda} if cpu_vs_cuda else {})
    _save(ref, path)
    ref.meta["cache"] = str(path)
    return ref


def _cpu_difference(reference_dir: Path, window: np.ndarray, first: int, gpu_logits: Any) -> dict[str, float]:
    """The CUDA reference vs the float32 CPU reference on the first window [1, ctx]: how far the devices disagree."""
    import torch

    logits = next(iter(reference_windows(reference_dir, window, first, "cpu", torch.float32)))
    tgt = torch.from_numpy(window[0, first + 1:].astype(np.int64))
    s = metrics.compare(gpu_logits.cpu(), tgt, metrics.summarize(logits))
    ppl_cpu = math.exp(-float(metrics.target_logprob(logits, tgt).mean()))
    return {"kl_mean": float(s.kl.mean()), "top1": float(s.top1.mean()),
            "dppl_pct": 100.0 * (math.exp(float(s.nll.mean())) / ppl_cpu - 1.0)}
