"""Calibration statistics from one float pass: GPTQ Hessians, AWQ activation means, the GGUF importance matrix.

    for each decoder layer (``qconvert.calibration.stream_layers``: one layer in memory, float weights):
        run the float layer with a hook on every linear input x [n, t, in]; per input site (the linears that
        read the same x, i.e. one group of ``spec.sequential``) accumulate
            H      = 2/N Σ x xᵀ        GPTQ's Hessian (``add_to_hessian``), f32 [in, in]
            sum_sq = Σ x²   per column the importance matrix llama-imatrix records, f64 [in]
            absmax = Σ |x| / N         AWQ's per-channel activation mean, f32 [in]
        the hooked forward's output is the next layer's input

Unlike the GPTQ/AWQ drivers this pass never quantizes, so one pass serves every consumer: ``qconvert gguf
--stats`` (imatrix), ``qconvert gptq --stats`` (quantizes from the stored Hessians with no further forward)
and a release that builds several formats. Saved as one safetensors file (``save`` / ``load``), one entry per
input site, with the calibration set's description and token hash in its metadata (and, with a held-out split, the
held-out windows' token ids: the text a size budget's model-level check runs, ``qconvert.gguf.budget_check``).

The held-out guard (``qconvert.int4.guard``): with ``collect_stats(..., holdout=F)`` the last windows are also
summed into a second Hessian per site (``hessian_heldout``, doubling the Hessians' size); ``quantize_from_stats``
then fits GPTQ on the other windows' Hessian (recovered from the two, ``fit_hessian``) and keeps, per linear, GPTQ or
symmetric round-to-nearest, whichever reconstructs better on the held-out tokens — as the calibrating driver does.
``hessian`` stays the Hessian of all tokens, so a file without the split is read the same way.

Memory: with ``collect_stats(..., path=FILE)`` each layer's Hessians are streamed into FILE as soon as the layer
is done, and ``load`` reads a Hessian only when GPTQ asks for it, so host memory stays about one layer's
statistics (a 72B model's Hessians are ~340 GB; ``hessians=False`` skips them when only the importance matrix
and the AWQ means are wanted).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qconvert.calibration.driver import (
    CalibrationError,
    CalibrationSettings,
    DeviceLayer,
    LayerContext,
    read_config,
    stream_layers,
)
from qconvert.errors import CheckpointError
from qconvert.gguf.imatrix import write_imatrix
from qconvert.int4 import QuantizedLinear, add_to_hessian
from qconvert.io.atomic import atomic_output
from qconvert.io.safetensors import SafetensorsCheckpoint, SafetensorsStreamWriter
from qconvert.registry import spec_for_config
from qconvert.tokenhash import tokens_sha256

FORMAT = "qconvert-calibration-stats/1"
HELDOUT_IDS = "heldout_ids"  # the held-out windows' token ids, I32 [n, t] (files with a held-out split)


class SiteStats:
    """Statistics of one input site (the input x that one or more linears read).

    ``hessian`` (f32 [in, in], 2/N Σ x xᵀ) is held in memory or read on demand from a statistics file.
    """

    def __init__(self, sum_sq: torch.Tensor, mean_abs: torch.Tensor, n_tokens: int,
                 hessian: torch.Tensor | None = None, file: tuple[Path, str] | None = None,
                 n_heldout: int = 0, heldout: torch.Tensor | None = None) -> None:
        self.sum_sq = sum_sq  # f64 [in], Σ x²
        self.mean_abs = mean_abs  # f32 [in], Σ |x| / N
        self.n_tokens = n_tokens
        self._hessian = hessian
        self._file = file  # (statistics file, tensor name) of a Hessian not held in memory
        self.n_heldout = n_heldout  # tokens of the held-out windows (0: no split recorded)
        self._heldout = heldout  # their Hessian, when held in memory (else read from the file beside ``hessian``)

    @property
    def in_features(self) -> int:
        return int(self.sum_sq.shape[0])

    @property
    def has_hessian(self) -> bool:
        return self._hessian is not None or self._file is not None

    @property
    def hessian(self) -> torch.Tensor:
        if self._hessian is not None:
            return self._hessian
        if self._file is None:
            raise CalibrationError("these statistics were collected without GPTQ Hessians (importance matrix and "
                                   "AWQ means only); recollect them with --save-stats to quantize GPTQ from them.")
        return self._read(self._file[1])

    @property
    def heldout_hessian(self) -> torch.Tensor:
        """The Hessian of the held-out windows' tokens (``n_heldout`` > 0 only)."""
        if self._heldout is not None:
            return self._heldout
        if not self.n_heldout or self._file is None:
            raise CalibrationError("these statistics have no held-out split; recollect them with the guard on "
                                   "(qconvert gptq --save-stats without --no-guard).")
        return self._read(self._file[1] + "_heldout")

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        assert self._file is not None
        with safe_open(str(self._file[0]), "pt") as f:
            return f.get_tensor(name)


@dataclass
class CalibrationStats:
    """Per-linear statistics (full module names; linears of one input site share one ``SiteStats``)."""

    sites: dict[str, SiteStats]  # site key (first linear of the group) -> stats
    linears: dict[str, str]  # full module name -> site key
    source: str = ""  # calibration set description
    tokens_sha256: str = ""
    seconds: float = 0.0
    meta: dict[str, str] = field(default_factory=dict)
    heldout_ids: torch.Tensor | None = None  # the held-out windows' token ids [n, t] (a model-level check's text)

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
        """One safetensors file (atomic, streamed one site at a time), readable with ``CalibrationStats.load``."""
        if not all(site.has_hessian for site in self.sites.values()):
            raise CalibrationError("these statistics have no GPTQ Hessians to save; collect them with hessians=True.")
        with atomic_output(Path(path), force=force) as tmp:
            writer = _StatsWriter(tmp, {k: s.in_features for k, s in self.sites.items()}, self._metadata(),
                                  self.holdout_windows > 0,
                                  None if self.heldout_ids is None else tuple(self.heldout_ids.shape))
            try:
                if self.heldout_ids is not None:
                    writer.write_ids(self.heldout_ids)
                for key, site in self.sites.items():
                    writer.write_site(key, site.hessian, site.sum_sq, site.mean_abs,
                                      site.heldout_hessian if self.holdout_windows else None)
                writer.finish(self._metadata())
            finally:
                writer.close()

    @property
    def holdout_windows(self) -> int:
        """Calibration windows (the last ones) summed into the held-out Hessians; 0 when there is no split."""
        return int(self.meta.get("holdout_windows", 0))

    def _metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "linears": json.dumps(self.linears), "source": self.source,
                "tokens_sha256": self.tokens_sha256, "seconds": f"{self.seconds:.3f}",
                "n_tokens": json.dumps({k: s.n_tokens for k, s in self.sites.items()}),
                "n_heldout": json.dumps({k: s.n_heldout for k, s in self.sites.items()}), "meta": json.dumps(self.meta)}

    @classmethod
    def load(cls, path: Path) -> CalibrationStats:
        """Read a statistics file: the small per-column vectors now, each Hessian when it is first used."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"statistics file {path} does not exist; create it with --save-stats FILE.")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                if meta.get("format") != FORMAT:
                    raise CheckpointError(f"{path} is not a qconvert statistics file (format {meta.get('format')!r}, "
                                          f"expected {FORMAT!r}); recreate it with --save-stats.")
                counts = json.loads(meta["n_tokens"])
                heldout = json.loads(meta.get("n_heldout", "{}"))
                sites = {k: SiteStats(f.get_tensor(f"{k}.sum_sq"), f.get_tensor(f"{k}.mean_abs"), int(n),
                                      file=(path, f"{k}.hessian") if f"{k}.hessian" in names else None,
                                      n_heldout=int(heldout.get(k, 0)) if f"{k}.hessian_heldout" in names else 0)
                         for k, n in counts.items()}
                ids = f.get_tensor(HELDOUT_IDS).long() if HELDOUT_IDS in names else None
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises several types for a bad header
            raise CheckpointError(f"{path} is not a qconvert statistics file ({e}); recreate it with --save-stats.") from e
        return cls(sites, json.loads(meta["linears"]), meta.get("source", ""), meta.get("tokens_sha256", ""),
                   float(meta.get("seconds", 0)), json.loads(meta.get("meta", "{}")), ids)

    def check_model(self, model_dir: Path) -> None:
        """Refuse statistics collected on a model with other linears or other input widths."""
        config = json.loads((Path(model_dir) / "config.json").read_text())
        spec = spec_for_config(config)
        from qconvert.int4.writer import qwen2_linear_shapes

        shapes = qwen2_linear_shapes(config)
        for i in range(int(config["num_hidden_layers"])):
            for sub in (s for g in spec.sequential for s in g):
                module = f"{spec.block_prefix}.{i}.{sub}"
                width = self.site(module).in_features
                if width != shapes[sub][1]:
                    raise CalibrationError(f"the statistics for {module} have {width} input columns but the "
                                           f"model's has {shapes[sub][1]}: they come from another model. Recollect "
                                           "them for this checkpoint (--save-stats).")


class _StatsWriter:
    """Streams site statistics (hessian, sum_sq, mean_abs per site, in site order) into one safetensors file."""

    def __init__(self, path: Path, widths: dict[str, int], draft_meta: dict[str, str], heldout: bool,
                 ids_shape: tuple[int, ...] | None = None) -> None:
        decl: dict[str, tuple[str, tuple[int, ...]]] = {} if ids_shape is None else {HELDOUT_IDS: ("I32", ids_shape)}
        for key, n in widths.items():
            decl.update({f"{key}.hessian": ("F32", (n, n)), f"{key}.sum_sq": ("F64", (n,)), f"{key}.mean_abs": ("F32", (n,))})
            if heldout:
                decl[f"{key}.hessian_heldout"] = ("F32", (n, n))
        self._w = SafetensorsStreamWriter(path, decl, reserve=len(json.dumps(draft_meta)) + 1024)

    def write_ids(self, ids: torch.Tensor) -> None:
        """The held-out windows' token ids: first, before any site."""
        self._w.write(HELDOUT_IDS, ids.to(torch.int32).cpu().numpy())

    def write_site(self, key: str, hessian: torch.Tensor, sum_sq: torch.Tensor, mean_abs: torch.Tensor,
                   heldout: torch.Tensor | None = None) -> None:
        self._w.write(f"{key}.hessian", hessian.float().cpu().numpy())
        self._w.write(f"{key}.sum_sq", sum_sq.double().cpu().numpy())
        self._w.write(f"{key}.mean_abs", mean_abs.float().cpu().numpy())
        if heldout is not None:
            self._w.write(f"{key}.hessian_heldout", heldout.float().cpu().numpy())

    def finish(self, meta: dict[str, str]) -> None:
        self._w.finish(meta)

    def close(self) -> None:
        self._w.close()


def collect_stats(model_dir: str | Path, ids: torch.Tensor, settings: CalibrationSettings = CalibrationSettings(),
                  progress: Callable[[int, int], None] | None = None, source: str = "", *,
                  path: Path | None = None, force: bool = False, hessians: bool = True,
                  holdout: float | None = None) -> CalibrationStats:
    """One float pass over calibration tokens ``ids`` [n, t]: every linear's input statistics, layer by layer.

    ``path``: stream the statistics into this file (atomic) as each layer finishes; the returned Hessians are
    then read back from it on demand, so memory stays about one layer. ``hessians=False``: skip GPTQ's Hessians
    (the importance matrix and AWQ means need only the per-column sums); incompatible with ``path``.
    ``holdout``: the held-out guard's fraction of windows (``holdout_count``); their tokens also get a Hessian of
    their own, so ``quantize_from_stats`` can judge GPTQ against round-to-nearest on them. None: no split.
    """
    from qconvert.int4.guard import holdout_count

    if path is not None and not hessians:
        raise CalibrationError("a statistics file holds GPTQ Hessians: collect them (hessians=True) to save one.")
    n_out = holdout_count(ids.shape[0], holdout) if holdout is not None and hessians else 0
    if path is None:
        return _collect(Path(model_dir), ids, settings, progress, source, hessians, None, n_out)
    path = Path(path)
    with atomic_output(path, force=force) as tmp:
        stats = _collect(Path(model_dir), ids, settings, progress, source, hessians, tmp, n_out)
    for key, site in stats.sites.items():
        site._file = (path, f"{key}.hessian")
    return stats


class _StatsPass:
    """The layer pass of the statistics: one hooked float forward accumulates every input site's sums."""

    def __init__(self, hessians: bool, writer: _StatsWriter | None, n_out: int = 0) -> None:
        self.hessians, self.writer, self.n_out = hessians, writer, n_out
        self.sites: dict[str, SiteStats] = {}

    def __call__(self, layer: DeviceLayer, h: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        site_of = ctx.spec.input_sites
        acc: dict[str, _SiteSums] = {}  # all windows
        held: dict[str, _SiteSums] = {}  # the held-out windows alone (their Hessian)

        def hook_into(*sums: dict[str, _SiteSums]) -> Callable[[str, torch.Tensor], None]:
            def hook(name: str, x: torch.Tensor) -> None:
                if site_of.get(name) == name:  # the other linears of a site read the same x
                    for d in sums:
                        d.setdefault(name, _SiteSums(x.shape[-1], x.device)).add(x, self.hessians)
            return hook

        n_fit = h.shape[0] - self.n_out
        out = ctx.run(layer, h[:n_fit], hook_into(acc))
        if self.n_out:
            out = torch.cat([out, ctx.run(layer, h[n_fit:], hook_into(acc, held))])
        for g in ctx.spec.sequential:
            a, b = acc[g[0]], held.get(g[0])
            site = SiteStats(a.sum_sq.cpu(), (a.sum_abs / a.n).float().cpu(), a.n, n_heldout=b.n if b else 0)
            if self.writer is not None:
                assert a.H is not None
                self.writer.write_site(ctx.prefix + g[0], a.H, site.sum_sq, site.mean_abs, b.H if b else None)
            elif a.H is not None:
                site._hessian = a.H.cpu()
                site._heldout = b.H.cpu() if b is not None and b.H is not None else None
            self.sites[ctx.prefix + g[0]] = site
        return out


class _SiteSums:
    """Running sums over the rows x [*, in] one input site saw: Hessian (optional), Σx², Σ|x|, row count."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.H: torch.Tensor | None = None
        self.n = 0
        self.sum_sq = torch.zeros(width, dtype=torch.float64, device=device)
        self.sum_abs = torch.zeros(width, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, hessian: bool) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if hessian:
            self.H, self.n = add_to_hessian(self.H, self.n, x)
        else:
            self.n += x.shape[0]
        self.sum_sq += (x.double() ** 2).sum(0)
        self.sum_abs += x.abs().double().sum(0)


def _collect(model_dir: Path, ids: torch.Tensor, settings: CalibrationSettings,
             progress: Callable[[int, int], None] | None, source: str, hessians: bool, out: Path | None,
             n_out: int = 0) -> CalibrationStats:
    start = time.perf_counter()
    config = read_config(model_dir)
    spec = spec_for_config(config)
    meta = {"n_samples": str(ids.shape[0]), "seq_len": str(ids.shape[1]), "device": settings.device,
            "dtype": str(settings.dtype).removeprefix("torch."), **({"holdout_windows": str(n_out)} if n_out else {})}
    prefixes = [f"{spec.block_prefix}.{i}." for i in range(int(config["num_hidden_layers"]))]
    linears = {p + sub: p + key for p in prefixes for sub, key in spec.input_sites.items()}
    writer = None
    if out is not None:
        from qconvert.int4.writer import qwen2_linear_shapes

        shapes = qwen2_linear_shapes(config)
        widths = {p + g[0]: shapes[g[0]][1] for p in prefixes for g in spec.sequential}
        draft = CalibrationStats({k: SiteStats(torch.zeros(0), torch.zeros(0), ids.numel()) for k in widths},
                                 linears, source, tokens_sha256(ids), 1e9, meta)._metadata()
        draft["n_heldout"] = json.dumps({k: ids.numel() for k in widths})  # room for the final counts
        writer = _StatsWriter(out, widths, draft, n_out > 0, tuple(ids[len(ids) - n_out:].shape) if n_out else None)
    try:
        if writer is not None and n_out:
            writer.write_ids(ids[len(ids) - n_out:])
        stats_pass = _StatsPass(hessians, writer, n_out)
        stream_layers(SafetensorsCheckpoint(model_dir), config, ids, stats_pass, settings, progress=progress)
        stats = CalibrationStats(stats_pass.sites, linears, source, tokens_sha256(ids), time.perf_counter() - start,
                                 meta, ids[len(ids) - n_out:].clone() if n_out else None)
        if writer is not None:
            writer.finish(stats._metadata())
    finally:
        if writer is not None:
            writer.close()
    return stats


def quantize_from_stats(model_dir: str | Path, stats: CalibrationStats, cfg: object,
                        on_linear: Callable[[str, QuantizedLinear], None],
                        settings: CalibrationSettings = CalibrationSettings(),
                        progress: Callable[[int, int], None] | None = None, *, guard: bool = True) -> dict[str, int]:
    """GPTQ every decoder linear from stored Hessians: no forward pass (the Hessians come from the float model).

    A driver pass without propagation: each layer's float32 weights are loaded once and quantized against the
    Hessians of their input sites, read from the statistics one site at a time. ``guard`` and statistics with a
    held-out split (``collect_stats(holdout=...)``): GPTQ fits the other windows and each linear keeps GPTQ or
    symmetric round-to-nearest, whichever does better on the held-out tokens. Returns the linears kept per result
    (``{"gptq": n}`` without the guard).
    """
    from qconvert.int4 import GPTQConfig
    from qconvert.int4.guard import fit_hessian, guarded_gptq

    if not isinstance(cfg, GPTQConfig):
        raise CalibrationError("only GPTQ can run from stored statistics; AWQ searches its scales on the layer's "
                               "own activations. Run `qconvert awq` without --stats.")
    model_dir = Path(model_dir)
    stats.check_model(model_dir)

    kept: dict[str, int] = {}

    def from_stats(layer: DeviceLayer, h: torch.Tensor, ctx: LayerContext) -> None:
        for group in ctx.spec.sequential:  # the linears of a group read one input: one Hessian, read once
            site = stats.site(ctx.prefix + group[0])
            H = site.hessian.to(ctx.settings.device)
            split = guard and site.n_heldout > 0
            H_out = site.heldout_hessian.to(ctx.settings.device) if split else None
            if H_out is not None:
                H = fit_hessian(H, site.n_tokens, H_out, site.n_heldout)
            for sub in group:
                q = guarded_gptq(layer.weight(sub).float(), H, H_out, cfg)
                kind = str(q.info.get("kept", "gptq"))
                kept[kind] = kept.get(kind, 0) + 1
                on_linear(ctx.prefix + sub, q)

    ids = torch.zeros((1, 1), dtype=torch.long)  # no forward runs: only the layer loop is used
    stream_layers(SafetensorsCheckpoint(model_dir), read_config(model_dir), ids, from_stats,
                  dataclasses.replace(settings, dtype=torch.float32), propagate=False, progress=progress)
    return kept
