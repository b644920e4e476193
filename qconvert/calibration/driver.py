"""The one streaming layer-by-layer driver (IST-DASLab's ``llama_sequential``), with per-layer passes.

    ids [n, t] --embed--> h [n, t, hidden]           (layer-0 inputs, captured once, kept on the device)
    for each decoder layer i:
        layer = its weights on the device             (float, or dequantized from GPTQ/AWQ packing)
        out = layer_pass(layer, h, ctx)               (statistics, GPTQ, AWQ, RTN ... may replace weights)
        h <- out, or layer(h) with the pass's weights (the next layer sees what this layer now produces)
    return h                                          (the last layer's output: final norm + head score it)

Every path that walks a model runs through ``stream_layers``: GPTQ, AWQ and RTN (``qconvert.calibration.quantize``), the
statistics pass and the importance matrix (``qconvert.calibration.stats``), and the scoring forwards of model cards and
``qconvert verify`` (``streamed_logits``: the float reference and the dequantized GPTQ/AWQ runner). Peak memory
is one layer's weights plus the activations [n, t, hidden] twice (plus what a pass keeps: a Hessian per input
site, AWQ's cached inputs), whatever the model size. Forwards run in bfloat16 or float32 (Qwen2 overflows
float16); statistics are accumulated in float32/float64 by the passes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from qconvert.errors import QConvertError
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.model import qwen2
from qconvert.registry import ArchSpec, spec_for_config

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

Progress = Callable[[int, int], None]  # (layers done, n_layers)


class CalibrationError(QConvertError):
    """Calibration cannot run or produced non-finite activations."""


class DeviceError(QConvertError):
    """The requested device is not available."""


@dataclass(frozen=True)
class CalibrationSettings:
    """How the driver runs: device (``cpu``/``cuda``/``cuda:1``), compute dtype, forward minibatch in samples."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch_size: int = 8


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} was requested but torch sees no CUDA GPU (torch {torch.__version__}, "
                              f"built with CUDA {torch.version.cuda}). Use --device cpu (slow for 7B and up) or "
                              "--device auto, or install a CUDA build of torch on a machine with an NVIDIA GPU.")
        return device
    if device != "cpu":
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N.")
    return device


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU (CPU bf16 matmuls are slow); float16 is refused."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in COMPUTE_DTYPES:
        raise CalibrationError(f"calibration dtype {name!r} is not supported; use bfloat16 or float32 (Qwen2's "
                               "activations overflow float16).")
    return COMPUTE_DTYPES[name]


# Edits one decoder layer's float32 tensors (names relative to the layer prefix, the first argument) in place as
# the driver loads them, before the compute dtype: SmoothQuant's folding (``qconvert.w8a8.Smoothing``).
LayerTransform = Callable[[str, dict[str, torch.Tensor]], None]


class DeviceLayer:
    """One decoder layer on the device: its tensors (names relative to the layer) in the compute dtype.

    ``quantization_config`` None reads float weights; a GPTQ/AWQ dict dequantizes the packed linears
    (``dequantize_gptq`` / ``dequantize_awq``: exactly the weights the loaders multiply with).
    """

    def __init__(self, ckpt: SafetensorsCheckpoint, prefix: str, settings: CalibrationSettings,
                 pad_to: int | None = None, quantization_config: Mapping[str, Any] | None = None,
                 transform: LayerTransform | None = None) -> None:
        from qconvert.int4.formats import dequantized_tensors

        self.prefix = prefix
        tensors = dequantized_tensors(ckpt, prefix, quantization_config, settings.device)
        if transform is not None:
            transform(prefix, tensors)
        self.p = {n: t.to(settings.device, settings.dtype) for n, t in tensors.items()}
        if pad_to is not None:  # Qwen's zero padding of the MLP (see qconvert.int4.writer.pad_intermediate)
            from qconvert.int4.writer import pad_intermediate

            gate, up, down = "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"
            self.p[gate], self.p[up], self.p[down] = pad_intermediate(self.p[gate], self.p[up], self.p[down], pad_to)

    def weight(self, sub: str) -> torch.Tensor:
        return self.p[f"{sub}.weight"]


@dataclass(frozen=True)
class LayerContext:
    """What a pass needs besides the layer and its input: where it is and how to run it."""

    index: int
    prefix: str  # "model.layers.3."
    dims: qwen2.Qwen2Dims
    rope: tuple[torch.Tensor, torch.Tensor]
    spec: ArchSpec
    settings: CalibrationSettings

    def run(self, layer: DeviceLayer | Mapping[str, torch.Tensor], h: torch.Tensor,
            hook: qwen2.LinearHook | None = None) -> torch.Tensor:
        """The output of this layer's position with ``layer``'s tensors (or a mapping of them: a float, quantized
        or mixed copy) on all samples ``h`` [n, t, hidden], ``settings.batch_size`` samples at a time."""
        p = layer.p if isinstance(layer, DeviceLayer) else layer
        return run_layer(p, h, self.dims, self.rope, self.settings.batch_size, hook)


class LayerPass(Protocol):
    """One pass over a layer: may read the layer's inputs ``h`` and replace its weights (quantization).

    Returns the layer's output when the pass computed it anyway (a hooked forward), else None: the driver then
    runs the layer with whatever weights it has now, if a later layer needs the output (``propagate``).
    """

    def __call__(self, layer: DeviceLayer, h: torch.Tensor, ctx: LayerContext) -> torch.Tensor | None: ...


def check_finite(h: torch.Tensor, where: str) -> None:
    if not torch.isfinite(h).all():
        raise CalibrationError(f"non-finite activations (NaN/Inf) in the output of {where}. The checkpoint may be "
                               "corrupt, or the forward overflowed: use --dtype float32 (never float16 for Qwen2).")


def run_layer(p: Mapping[str, torch.Tensor], h: torch.Tensor, dims: qwen2.Qwen2Dims,
              rope: tuple[torch.Tensor, torch.Tensor], batch: int, hook: qwen2.LinearHook | None = None
              ) -> torch.Tensor:
    """The decoder layer with tensors ``p`` on all samples ``h`` [n, t, hidden], in minibatches of ``batch``."""
    with torch.no_grad():
        return torch.cat([qwen2.decoder_layer(p, h[i:i + batch], dims, rope, hook)
                          for i in range(0, h.shape[0], batch)])


def read_config(model_dir: Path) -> dict[str, Any]:
    from qconvert.registry import read_model_config

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CalibrationError(f"{model_dir} has no config.json; point at a Hugging Face checkpoint directory.")
    return read_model_config(model_dir)


def stream_layers(ckpt: SafetensorsCheckpoint, config: Mapping[str, Any], ids: torch.Tensor,
                  layer_pass: LayerPass | None = None, settings: CalibrationSettings = CalibrationSettings(), *,
                  quantization_config: Mapping[str, Any] | None = None, pad_to: int | None = None,
                  propagate: bool = True, progress: Progress | None = None,
                  transform: LayerTransform | None = None) -> torch.Tensor:
    """Run ``layer_pass`` on every decoder layer of ``ckpt`` over the token windows ``ids`` [n, t].

    The layers come one at a time (float, or dequantized per ``quantization_config``); each sees the previous
    layer's output as the pass left it. ``propagate=False``: the pass needs no activations (round-to-nearest),
    so no forward runs. ``transform`` edits each layer's tensors as they are loaded. Returns the last layer's
    output [n, t, hidden] (the embeddings when nothing ran).
    """
    spec = spec_for_config(dict(config))
    dims = qwen2.Qwen2Dims.from_config(config)
    dev, dt = settings.device, settings.dtype
    n_layers = int(config["num_hidden_layers"])
    if propagate:
        h = embed_rows(ckpt, ids, settings)
    else:
        h = torch.empty((0, ids.shape[1], dims.hidden_size), device=dev, dtype=dt)  # passes that need no inputs
    rope = qwen2.rope_tables(dims, ids.shape[1], dev, dt)
    for i in range(n_layers):
        prefix = f"{spec.block_prefix}.{i}."
        layer = DeviceLayer(ckpt, prefix, settings, pad_to, quantization_config, transform)
        ctx = LayerContext(i, prefix, dims, rope, spec, settings)
        out = layer_pass(layer, h, ctx) if layer_pass is not None else None
        if out is None and propagate:
            out = ctx.run(layer, h)
        if out is not None:
            check_finite(out, f"decoder layer {i} ({prefix.rstrip('.')})")
            h = out
        del layer
        if progress is not None:
            progress(i + 1, n_layers)
    return h


VOCAB_SLICE_BYTES = 1 << 28  # float32 bytes of embedding / lm_head rows held at once (256 MiB)


def _row_slices(ckpt: SafetensorsCheckpoint, name: str) -> list[tuple[int, int]]:
    rows, cols = ckpt.entries[name].shape
    step = max(1, VOCAB_SLICE_BYTES // (4 * int(cols)))
    return [(a, min(a + step, int(rows))) for a in range(0, int(rows), step)]


def embed_rows(ckpt: SafetensorsCheckpoint, ids: torch.Tensor,
               settings: CalibrationSettings = CalibrationSettings()) -> torch.Tensor:
    """Layer-0 input [n, t, hidden] of ``ids`` [n, t], reading the embedding one vocabulary slice at a time.

    A 72B embedding is 5 GB in float32; only the rows the ids name are kept, so the peak is one slice.
    """
    name = "model.embed_tokens.weight"
    hidden = int(ckpt.entries[name].shape[1])
    flat = ids.reshape(-1).cpu()
    out = torch.empty((flat.numel(), hidden), dtype=settings.dtype, device=settings.device)
    for a, b in _row_slices(ckpt, name):
        pos = ((flat >= a) & (flat < b)).nonzero().squeeze(1)
        if pos.numel():
            rows = torch.from_numpy(ckpt.read_f32(name, (a, b)))
            out[pos.to(settings.device)] = rows[flat[pos] - a].to(settings.device, settings.dtype)
    return out.reshape(*ids.shape, hidden)


def head_name(config: Mapping[str, Any]) -> str:
    """The output projection's tensor: the embedding matrix when the model ties them."""
    return "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"


class StreamedHead:
    """Final RMSNorm + output projection, with the projection held whole when small and read in vocabulary slices
    (one positioned read per slice and call) when its float32 copy would be larger than a slice."""

    def __init__(self, ckpt: SafetensorsCheckpoint, config: Mapping[str, Any],
                 settings: CalibrationSettings = CalibrationSettings()) -> None:
        self.ckpt, self.name, self.settings = ckpt, head_name(config), settings
        self.eps = qwen2.Qwen2Dims.from_config(config).rms_norm_eps
        self.norm = torch.from_numpy(ckpt.read_f32("model.norm.weight")).to(settings.device, settings.dtype)
        self.slices = _row_slices(ckpt, self.name)
        self.whole = self._rows(self.slices[0][0], self.slices[-1][1]) if len(self.slices) == 1 else None

    def _rows(self, a: int, b: int) -> torch.Tensor:
        return torch.from_numpy(self.ckpt.read_f32(self.name, (a, b))).to(self.settings.device, self.settings.dtype)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [..., vocab] of last hidden states ``h`` [..., hidden]."""
        x = qwen2.rms_norm(h, self.norm, self.eps)
        if self.whole is not None:
            return torch.nn.functional.linear(x, self.whole).float()
        return torch.cat([torch.nn.functional.linear(x, self._rows(a, b)).float() for a, b in self.slices], dim=-1)


def streamed_logits(ckpt: SafetensorsCheckpoint, config: Mapping[str, Any], windows: torch.Tensor, first: int,
                    settings: CalibrationSettings = CalibrationSettings(), *,
                    quantization_config: Mapping[str, Any] | None = None,
                    progress: str | None = None) -> Iterator[torch.Tensor]:
    """Float32 logits [t - 1 - first, vocab] of positions ``first .. t - 2`` of each window of ``windows`` [n, t].

    All windows go through the layers together (``stream_layers``, no pass), then the final norm and head run
    one window at a time, so only one window's logits exist at once. ``progress`` names a tqdm bar on stderr.
    """
    from tqdm import tqdm

    n_layers = int(config["num_hidden_layers"])
    bar = tqdm(total=n_layers, desc=progress, unit="layer", disable=progress is None, file=sys.stderr)

    def advance(done: int, total: int) -> None:
        bar.update(1)

    try:
        h = stream_layers(ckpt, config, windows, None, settings, quantization_config=quantization_config,
                          progress=advance)
    finally:
        bar.close()
    head = StreamedHead(ckpt, config, settings)
    with torch.no_grad():
        for w in range(h.shape[0]):
            yield head(h[w, first:-1])
