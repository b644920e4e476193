"""The quality a model card states: ``qconvert verify``'s method and metrics, on a fixed slice of its text.

There is one definition of quality in qconvert: ``qconvert.verify`` (windows of ``ctx`` tokens, positions
``ctx/2 .. ctx-2`` scored, KL/PPL/top-1 from the cached reference summary). A model card runs exactly that on
the first ``chunks`` windows of the default held-out text, and records ctx, chunks and the token sha256, so
``qconvert verify ARTIFACT --reference SOURCE --ctx C --chunks N`` reproduces its figures to the last digit.
"""

from __future__ import annotations

from pathlib import Path

from qconvert.verify.result import ArtifactResult

CARD_CTX = 512
CARD_CHUNKS = 4  # 2,048 tokens, 1,020 scored positions: cheap next to calibration at any model size


def measure(source_dir: Path, artifact: Path, *, ctx: int = CARD_CTX, chunks: int = CARD_CHUNKS, device: str = "cpu",
            cache_dir: Path | None = None, progress: bool = False) -> ArtifactResult:
    """``artifact`` in its default runtime against the float ``source_dir``, by verify's method.

    The reference pass (streamed, one layer in memory) is cached like ``qconvert verify``'s, so a later verify of
    the same source, text, ctx and chunks costs no second pass.
    """
    from qconvert.verify import build_reference, eval_tokens, verify_artifact

    reference = build_reference(Path(source_dir), eval_tokens(Path(source_dir)), ctx=ctx, chunks=chunks,
                                device=device, cache_dir=cache_dir, progress=progress)
    return verify_artifact(Path(artifact), reference, device=device, progress=progress)


def describe(r: ArtifactResult) -> str:
    """One line: the figures ``qconvert verify`` prints for the same artifact, text and ctx."""
    return (f"perplexity {r.ppl_ref:.4f} (float) -> {r.ppl:.4f} ({r.dppl_pct:+.2f}%), mean KL {r.kl_mean:.5f}, "
            f"top-1 agreement {100 * r.top1:.1f}% on {r.n_scored:,} scored positions ({r.n_windows} windows of "
            f"{r.ctx} tokens, positions ctx/2..ctx-2, as `qconvert verify --ctx {r.ctx} --chunks {r.n_windows}`; "
            f"token sha256 {r.tokens_sha256[:16]}…)")
