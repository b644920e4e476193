"""Quality of a GPTQ/AWQ checkpoint against its float source, streamed one layer at a time (for model cards).

Both models run through qconvert's Qwen2 forward (equal to transformers' within 1e-4), streamed one decoder
layer at a time by ``streamed_hidden`` (the quantized layers dequantized from the packed tensors: exactly the
weights the loaders multiply with). Peak memory is one layer plus the hidden states of both models, so the
figure is cheap next to calibration at any model size. Every position of each window is scored. The
verification stage (``qconvert verify``) measures the same in the artifact's own runtime, and its dequant runner
uses ``streamed_hidden`` too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.calibrate import CalibrationSettings
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.model import qwen2
from qconvert.registry import spec_for_config


@dataclass(frozen=True)
class Quality:
    ppl_float: float
    ppl_quant: float
    kl_mean: float  # mean KL(float || quantized) per scored token, nats
    top1: float  # fraction of positions where both pick the same next token
    n_tokens: int

    @property
    def dppl_pct(self) -> float:
        return 100.0 * (self.ppl_quant / self.ppl_float - 1.0)

    def describe(self) -> str:
        return (f"perplexity {self.ppl_float:.3f} (float) -> {self.ppl_quant:.3f} ({self.dppl_pct:+.2f}%), "
                f"mean KL {self.kl_mean:.5f}, top-1 agreement {100 * self.top1:.1f}% on {self.n_tokens:,} "
                "held-out tokens")


def streamed_hidden(ckpt: SafetensorsCheckpoint, config: dict, quantization_config: dict | None, ids: torch.Tensor,
                    settings: CalibrationSettings = CalibrationSettings(), progress: str | None = None) -> torch.Tensor:
    """The last decoder layer's output [n, t, hidden] for windows ``ids`` [n, t], one layer's weights in memory.

    ``quantization_config`` None reads float weights; a GPTQ/AWQ dict dequantizes the packed linears
    (``dequantize_gptq`` / ``dequantize_awq``: exactly the weights the loaders multiply with). Windows run
    ``settings.batch_size`` at a time; ``progress`` names a tqdm bar on stderr (None: no bar).
    """
    import sys

    from tqdm import tqdm

    from qconvert.int4 import dequantized_tensors

    dims = qwen2.Qwen2Dims.from_config(config)
    prefix = spec_for_config(config).block_prefix
    dev, dt, b = settings.device, settings.dtype, settings.batch_size
    ids = ids.to(dev)
    h = qwen2.embed(torch.from_numpy(ckpt.read_f32("model.embed_tokens.weight")).to(dev, dt), ids)
    rope = qwen2.rope_tables(dims, ids.shape[1], dev, dt)
    layers = range(int(config["num_hidden_layers"]))
    with torch.no_grad():
        for i in tqdm(layers, desc=progress, unit="layer", disable=progress is None, file=sys.stderr):
            p = {k: v.to(dev, dt) for k, v in dequantized_tensors(ckpt, f"{prefix}.{i}.", quantization_config,
                                                                     dev).items()}
            h = torch.cat([qwen2.decoder_layer(p, h[k:k + b], dims, rope) for k in range(0, h.shape[0], b)])
    return h


def head_weights(ckpt: SafetensorsCheckpoint, config: dict, settings: CalibrationSettings = CalibrationSettings()
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(final norm gain, lm_head)`` for ``qwen2.head``; tied models read the embedding matrix."""
    head = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
    return tuple(torch.from_numpy(ckpt.read_f32(n)).to(settings.device, settings.dtype)  # type: ignore[return-value]
                 for n in ("model.norm.weight", head))


def compare_checkpoints(float_dir: Path, quant_dir: Path, ids: torch.Tensor,
                        settings: CalibrationSettings = CalibrationSettings(),
                        float_hidden: torch.Tensor | None = None) -> Quality:
    """PPL of both, KL and top-1 agreement on windows ``ids`` [n, t] (next-token prediction at every position).

    ``float_hidden``: the float model's ``streamed_hidden`` on the same windows, when scoring several checkpoints
    of one source (the float pass then runs once).
    """
    config = json.loads((Path(float_dir) / "config.json").read_text())
    qcfg = json.loads((Path(quant_dir) / "config.json").read_text()).get("quantization_config")
    eps = qwen2.Qwen2Dims.from_config(config).rms_norm_eps
    ids = ids.to(settings.device)
    runs = [(SafetensorsCheckpoint(Path(float_dir)), None), (SafetensorsCheckpoint(Path(quant_dir)), qcfg)]
    hs = [float_hidden.to(settings.device, settings.dtype) if float_hidden is not None and q is None else
          streamed_hidden(ck, config, q, ids, settings) for ck, q in runs]
    heads = [head_weights(ck, config, settings) for ck, _ in runs]
    nll = [0.0, 0.0]
    kl, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for k in range(ids.shape[0]):
            logp = [torch.log_softmax(qwen2.head(nw, lm, hs[j][k:k + 1], eps)[0].double(), -1)
                    for j, (nw, lm) in enumerate(heads)]
            target = ids[k, 1:, None]
            for j in range(2):
                nll[j] -= logp[j][:-1].gather(1, target).sum().item()
            kl += (logp[0].exp() * (logp[0] - logp[1])).sum().item()
            agree += int((logp[0].argmax(-1) == logp[1].argmax(-1)).sum().item())
            n += ids.shape[1]
    scored = ids.shape[0] * (ids.shape[1] - 1)
    return Quality(math.exp(nll[0] / scored), math.exp(nll[1] / scored), kl / n, agree / n, scored)


def eval_windows(model_dir: Path, n_windows: int = 2, seq_len: int = 512) -> torch.Tensor:
    """The project's held-out text (never used for calibration) as [n_windows, seq_len] token ids, or fewer."""
    from tokenizers import Tokenizer

    from qconvert.fixtures.corpus import eval_text

    ids = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(eval_text()).ids
    n = max(1, min(n_windows, len(ids) // seq_len))
    seq_len = min(seq_len, len(ids))
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
