"""Quality of a GPTQ/AWQ checkpoint against its float source, streamed one layer at a time (for model cards).

Both models run side by side through qconvert's Qwen2 forward (equal to transformers' within 1e-4): the float
layer i from the source, the quantized layer i dequantized from the packed tensors (``dequantize_gptq`` /
``dequantize_awq``: exactly the weights the loaders multiply with). Peak memory is two layers plus the
activations, so the figure is cheap next to calibration at any model size. Every position of each window is
scored. The verification stage (``qconvert verify``) measures the same in the artifact's own runtime.
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


def _layer(ckpt: SafetensorsCheckpoint, prefix: str, qcfg: dict | None, s: CalibrationSettings) -> dict:
    from qconvert.int4 import dequantized_tensors

    return {k: v.to(s.device, s.dtype) for k, v in dequantized_tensors(ckpt, prefix, qcfg, s.device).items()}


def compare_checkpoints(float_dir: Path, quant_dir: Path, ids: torch.Tensor,
                        settings: CalibrationSettings = CalibrationSettings()) -> Quality:
    """PPL of both, KL and top-1 agreement on windows ``ids`` [n, t] (next-token prediction at every position)."""
    config = json.loads((Path(float_dir) / "config.json").read_text())
    qcfg = json.loads((Path(quant_dir) / "config.json").read_text()).get("quantization_config")
    spec = spec_for_config(config)
    dims = qwen2.Qwen2Dims.from_config(config)
    fck, qck = SafetensorsCheckpoint(Path(float_dir)), SafetensorsCheckpoint(Path(quant_dir))
    dev, dt = settings.device, settings.dtype
    ids = ids.to(dev)

    def read(ck: SafetensorsCheckpoint, name: str) -> torch.Tensor:
        return torch.from_numpy(ck.read_f32(name)).to(dev, dt)

    hs = [qwen2.embed(read(ck, "model.embed_tokens.weight"), ids) for ck in (fck, qck)]
    rope = qwen2.rope_tables(dims, ids.shape[1], dev, dt)
    with torch.no_grad():
        for i in range(int(config["num_hidden_layers"])):
            prefix = f"{spec.block_prefix}.{i}."
            for j, (ck, q) in enumerate(((fck, None), (qck, qcfg))):
                p = _layer(ck, prefix, q, settings)
                hs[j] = torch.cat([qwen2.decoder_layer(p, hs[j][k:k + settings.batch_size], dims, rope)
                                   for k in range(0, hs[j].shape[0], settings.batch_size)])
        head = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
        nll = [0.0, 0.0]
        kl, agree, n = 0.0, 0, 0
        heads = [(read(ck, "model.norm.weight"), read(ck, head)) for ck in (fck, qck)]
        for k in range(ids.shape[0]):
            logp = [torch.log_softmax(qwen2.head(nw, lm, hs[j][k:k + 1], dims.rms_norm_eps)[0].double(), -1)
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
