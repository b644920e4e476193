"""One-line quality assertions for a user's own test suite (pytest or plain ``assert``-style).

    from qconvert.testing import assert_quality

    def test_release_artifact():
        assert_quality("dist/model-q4_k_m.gguf", "./Qwen2.5-0.5B-Instruct", max_dppl_pct=3.0)

The reference pass is cached on disk (keyed by the reference files, the tokens and the context), so a suite
that checks several artifacts of one model pays for one reference pass.
"""

from __future__ import annotations

from pathlib import Path

from qconvert.verify import (
    ArtifactResult,
    build_reference,
    check,
    eval_tokens,
    thresholds_for,
    verify_artifact,
)


def assert_quality(artifact: str | Path, reference: str | Path, *, max_dppl_pct: float | None = None,
                   max_kl: float | None = None, ctx: int = 512, chunks: int | None = 8,
                   text_file: str | Path | None = None, device: str = "cpu", runtime: str | None = None,
                   cache_dir: str | Path | None = None) -> ArtifactResult:
    """Verify ``artifact`` against the float checkpoint ``reference`` and raise ``AssertionError`` when ΔPPL% or
    mean KL exceed the limits (a limit left ``None`` takes the size- and bits-dependent default).

    ``reference`` is a checkpoint directory or a hub repo id. Returns the result for further asserts.
    """
    from qconvert.resolve import resolve_model

    ref_dir = resolve_model(str(reference)).path
    tokens = eval_tokens(ref_dir, text_file=Path(text_file) if text_file is not None else None)
    ref = build_reference(ref_dir, tokens, ctx=ctx, chunks=chunks, device=device,
                          cache_dir=Path(cache_dir) if cache_dir is not None else None, progress=False)
    result = verify_artifact(Path(artifact), ref, device=device, runtime=runtime, progress=False)
    why = check(result, thresholds_for(result, max_dppl_pct, max_kl))
    if why:
        raise AssertionError(f"{result.key}: " + "; ".join(why) + f" (PPL {result.ppl:.4f} vs reference "
                             f"{result.ppl_ref:.4f}, {result.n_scored} scored tokens, sha256 {result.tokens_sha256[:12]}…)")
    return result
