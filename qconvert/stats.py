"""Calibration statistics from one float pass: GPTQ Hessians, AWQ activation means, the GGUF importance matrix.

    ids [n, t] --embed--> h0
    for each decoder layer (one in memory, as in ``qconvert.calibrate``):
        run the float layer with a hook on every linear input x [n, t, in]; per input site (the linears that
        read the same x, i.e. one group of ``spec.sequential``) accumulate
            H      = 2/N Σ x xᵀ        GPTQ's Hessian (``add_to_hessian``), f32 [in, in]
            sum_sq = Σ x²   per column the importance matrix llama-imatrix records, f64 [in]
            absmax = Σ |x| / N         AWQ's per-channel activation mean, f32 [in]
        h <- layer(h) with the float weights

Unlike the GPTQ/AWQ drivers this pass never quantizes, so one pass serves every consumer: ``qconvert gguf
--stats`` (imatrix), ``qconvert gptq --stats`` (quantizes from the stored Hessians with no further forward)
and a release that builds several formats. Saved as one safetensors file (``save`` / ``load``), one entry per
input site, with the calibration set's description and token hash in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qconvert.calibrate import (
    CalibrationError,
    CalibrationSettings,
    _check_finite,
    _Layer,
    _run,
)
from qconvert.errors import CheckpointError
from qconvert.gguf.imatrix import write_imatrix
from qconvert.int4 import add_to_hessian
from qconvert.io.atomic import atomic_output
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.model import qwen2
from qconvert.registry import spec_for_config

FORMAT = "qconvert-calibration-stats/1"


@dataclass
class SiteStats:
    """Statistics of one input site (the input x that one or more linears read)."""

    hessian: torch.Tensor  # f32 [in, in], 2/N Σ x xᵀ
    sum_sq: torch.Tensor  # f64 [in], Σ x²
    mean_abs: torch.Tensor  # f32 [in], Σ |x| / N
    n_tokens: int


@dataclass
class CalibrationStats:
    """Per-linear statistics (full module names; linears of one input site share one ``SiteStats``)."""

    sites: dict[str, SiteStats]  # site key (first linear of the group) -> stats
    linears: dict[str, str]  # full module name -> site key
    source: str = ""  # calibration set description
    tokens_sha256: str = ""
    seconds: float = 0.0
    meta: dict[str, str] = field(default_factory=dict)

    def site(self, module: str) -> SiteStats:
        if module not in self.linears:
            raise CalibrationError(f"the statistics have no entry for {module}; they were collected on another "
                                   "model. Recollect them for this checkpoint (--save-stats).")
        return self.sites[self.linears[module]]

    def hessian(self, module: str) -> torch.Tensor:
        return self.site(module).hessian

    def imatrix(self) -> dict[str, np.ndarray]:
        """GGUF tensor name -> f32[in] per-column mean of x² (what ``export_gguf(imatrix=...)`` takes)."""
        return {name: (s.sum_sq / max(s.n_tokens, 1)).numpy().astype(np.float32)
                for name, s in self._gguf_sites().items()}

    def _gguf_sites(self) -> dict[str, SiteStats]:
        from qconvert.registry import QWEN2

        return {QWEN2.name_map.gguf_name(m + ".weight"): self.sites[k] for m, k in sorted(self.linears.items())}

    def write_imatrix(self, path: Path, *, force: bool = False) -> None:
        """The importance matrix as a llama.cpp imatrix GGUF (``llama-quantize --imatrix`` reads it)."""
        sites = self._gguf_sites()
        any_site = next(iter(self.sites.values()))
        write_imatrix(path, {n: s.sum_sq.numpy().astype(np.float32) for n, s in sites.items()},
                      {n: s.n_tokens for n, s in sites.items()}, datasets=[self.source or "qconvert"],
                      chunk_count=int(self.meta.get("n_samples", 1)),
                      chunk_size=int(self.meta.get("seq_len", any_site.n_tokens)), force=force)

    def save(self, path: Path, *, force: bool = False) -> None:
        """One safetensors file (atomic), readable with ``CalibrationStats.load``."""
        tensors = {}
        for key, s in self.sites.items():
            tensors[f"{key}.hessian"] = s.hessian.contiguous().cpu()
            tensors[f"{key}.sum_sq"] = s.sum_sq.contiguous().cpu()
            tensors[f"{key}.mean_abs"] = s.mean_abs.contiguous().cpu()
        meta = {"format": FORMAT, "linears": json.dumps(self.linears), "source": self.source,
                "tokens_sha256": self.tokens_sha256, "seconds": f"{self.seconds:.3f}",
                "n_tokens": json.dumps({k: s.n_tokens for k, s in self.sites.items()}), "meta": json.dumps(self.meta)}
        with atomic_output(Path(path), force=force) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> CalibrationStats:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"statistics file {path} does not exist; create it with --save-stats FILE.")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises several types for a bad header
            raise CheckpointError(f"{path} is not a qconvert statistics file ({e}); recreate it with --save-stats.") from e
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a qconvert statistics file (format {meta.get('format')!r}, "
                                  f"expected {FORMAT!r}); recreate it with --save-stats.")
        counts = json.loads(meta["n_tokens"])
        sites = {k: SiteStats(tensors[f"{k}.hessian"], tensors[f"{k}.sum_sq"], tensors[f"{k}.mean_abs"], int(n))
                 for k, n in counts.items()}
        return cls(sites, json.loads(meta["linears"]), meta.get("source", ""), meta.get("tokens_sha256", ""),
                   float(meta.get("seconds", 0)), json.loads(meta.get("meta", "{}")))

    def check_model(self, model_dir: Path) -> None:
        """Refuse statistics collected on a model with other linears or other input widths."""
        config = json.loads((Path(model_dir) / "config.json").read_text())
        spec = spec_for_config(config)
        from qconvert.int4.writer import qwen2_linear_shapes

        shapes = qwen2_linear_shapes(config)
        for i in range(int(config["num_hidden_layers"])):
            for sub in (s for g in spec.sequential for s in g):
                module = f"{spec.block_prefix}.{i}.{sub}"
                h = self.site(module).hessian
                if h.shape[0] != shapes[sub][1]:
                    raise CalibrationError(f"the statistics for {module} have {h.shape[0]} input columns but the "
                                           f"model's has {shapes[sub][1]}: they come from another model. Recollect "
                                           "them for this checkpoint (--save-stats).")


def tokens_sha256(ids: torch.Tensor) -> str:
    """sha256 of the token ids as little-endian int64 (shape-independent)."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()).hexdigest()


def collect_stats(model_dir: str | Path, ids: torch.Tensor, settings: CalibrationSettings = CalibrationSettings(),
                  progress: Callable[[int, int], None] | None = None, source: str = "") -> CalibrationStats:
    """One float pass over calibration tokens ``ids`` [n, t]: every linear's input statistics, layer by layer."""
    start = time.perf_counter()
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    spec = spec_for_config(config)
    ckpt = SafetensorsCheckpoint(model_dir)
    dims = qwen2.Qwen2Dims.from_config(config)
    dev, dt = settings.device, settings.dtype
    emb = torch.from_numpy(ckpt.read_f32("model.embed_tokens.weight")).to(dev, dt)
    h = qwen2.embed(emb, ids.to(dev))
    del emb
    rope = qwen2.rope_tables(dims, ids.shape[1], dev, dt)
    site_of = {sub: group[0] for group in spec.sequential for sub in group}
    sites: dict[str, SiteStats] = {}
    linears: dict[str, str] = {}
    n_layers = int(config["num_hidden_layers"])
    for i in range(n_layers):
        prefix = f"{spec.block_prefix}.{i}."
        layer = _Layer(ckpt, prefix, settings)
        acc: dict[str, list] = {}

        def hook(name: str, x: torch.Tensor, acc: dict = acc) -> None:
            if site_of.get(name) != name:
                return  # the other linears of a site read the same x
            x = x.reshape(-1, x.shape[-1]).float()
            if name not in acc:
                acc[name] = [None, 0, torch.zeros(x.shape[1], dtype=torch.float64, device=x.device),
                             torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)]
            a = acc[name]
            a[0], a[1] = add_to_hessian(a[0], a[1], x)
            a[2] += (x.double() ** 2).sum(0)
            a[3] += x.abs().double().sum(0)

        h = _run(layer, h, dims, rope, settings.batch_size, hook)
        _check_finite(h, f"decoder layer {i} ({prefix.rstrip('.')})")
        for sub, key in site_of.items():
            linears[prefix + sub] = prefix + key
        for key, (H, n, sq, ab) in acc.items():
            sites[prefix + key] = SiteStats(H.cpu(), sq.cpu(), (ab / n).float().cpu(), n)
        del layer
        if progress is not None:
            progress(i + 1, n_layers)
    meta = {"n_samples": str(ids.shape[0]), "seq_len": str(ids.shape[1]), "device": dev,
            "dtype": str(dt).removeprefix("torch.")}
    return CalibrationStats(sites, linears, source, tokens_sha256(ids), time.perf_counter() - start, meta)


def quantize_from_stats(model_dir: str | Path, stats: CalibrationStats, cfg: object,
                        on_linear: Callable[[str, object], None],
                        settings: CalibrationSettings = CalibrationSettings(),
                        progress: Callable[[int, int], None] | None = None) -> None:
    """GPTQ every decoder linear from stored Hessians: no forward pass (the Hessians come from the float model)."""
    from qconvert.int4 import GPTQConfig, gptq

    if not isinstance(cfg, GPTQConfig):
        raise CalibrationError("only GPTQ can run from stored statistics; AWQ searches its scales on the layer's "
                               "own activations. Run `qconvert awq` without --stats.")
    model_dir = Path(model_dir)
    stats.check_model(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    spec = spec_for_config(config)
    ckpt = SafetensorsCheckpoint(model_dir)
    n_layers = int(config["num_hidden_layers"])
    for i in range(n_layers):
        for sub in (s for g in spec.sequential for s in g):
            module = f"{spec.block_prefix}.{i}.{sub}"
            w = torch.from_numpy(ckpt.read_f32(module + ".weight")).to(settings.device)
            on_linear(module, gptq(w, stats.hessian(module).to(settings.device), cfg))
        if progress is not None:
            progress(i + 1, n_layers)

