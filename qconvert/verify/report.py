"""Presenting results: the terminal table, JSON, and a Markdown report with PNG plots.

Plots (matplotlib, optional): ΔPPL% and mean KL against bits per weight, and the quality/size frontier — KL
against file size with the artifacts no other artifact beats on both axes joined by a line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from qconvert.verify.result import ArtifactResult

COLUMNS = ("artifact", "runtime", "bpw", "size MB", "PPL", "ΔPPL", "ΔPPL%", "KL mean", "KL p99", "top-1", "top-5",
           "max|Δlogit|", "tok/s")


def _row(r: ArtifactResult) -> list[str]:
    return [r.name, r.runtime, f"{r.bits_per_weight:.2f}", f"{r.size_bytes / 1e6:.1f}", f"{r.ppl:.4f}",
            f"{r.dppl:+.4f}", f"{r.dppl_pct:+.2f}", f"{r.kl_mean:.5f}", f"{r.kl_p99:.4f}", f"{100 * r.top1:.1f}%",
            f"{100 * r.top5:.1f}%", f"{r.max_abs_dlogit:.3f}", f"{r.tokens_per_s:,.0f}"]


def format_table(results: Sequence[ArtifactResult], status: Sequence[str] | None = None) -> str:
    """A fixed-width table; ``status`` (one per result, e.g. PASS/FAIL) adds a last column."""
    header = list(COLUMNS) + (["gate"] if status is not None else [])
    rows = [_row(r) + ([status[i]] if status is not None else []) for i, r in enumerate(results)]
    widths = [max(len(header[c]), *(len(row[c]) for row in rows)) if rows else len(header[c]) for c in range(len(header))]
    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(row) for row in rows)])


def markdown_table(results: Sequence[ArtifactResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    return "\n".join(lines)


def write_json(results: Sequence[ArtifactResult], path: Path, extra: dict | None = None) -> None:
    data = (extra or {}) | {"results": [r.to_dict() for r in results]}
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def frontier(results: Sequence[ArtifactResult]) -> list[ArtifactResult]:
    """The artifacts that no other artifact beats on both size and KL, by increasing size."""
    out: list[ArtifactResult] = []
    for r in sorted(results, key=lambda r: (r.size_bytes, r.kl_mean)):
        if not out or r.kl_mean < out[-1].kl_mean:
            out.append(r)
    return out


def _plots(results: Sequence[ArtifactResult], out_dir: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for fname, attr, label in (("dppl_vs_bpw.png", "dppl_pct", "ΔPPL vs reference (%)"),
                               ("kl_vs_bpw.png", "kl_mean", "mean KL(reference ‖ artifact), nats")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in results:
            ax.scatter(r.bits_per_weight, getattr(r, attr))
            ax.annotate(r.format or r.name, (r.bits_per_weight, getattr(r, attr)), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        if attr == "kl_mean" and all(r.kl_mean > 0 for r in results):
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight (decoder matrices)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        files.append(fname)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        ax.scatter(r.size_bytes / 1e6, max(r.kl_mean, 1e-7))
        ax.annotate(r.key, (r.size_bytes / 1e6, max(r.kl_mean, 1e-7)), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    front = frontier(results)
    ax.plot([r.size_bytes / 1e6 for r in front], [max(r.kl_mean, 1e-7) for r in front], "k--", lw=1, label="frontier")
    ax.set_yscale("log")
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel("mean KL (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "frontier.png", dpi=120)
    plt.close(fig)
    return files + ["frontier.png"]


def write_report(results: Sequence[ArtifactResult], out_dir: Path, status: Sequence[str] | None = None) -> Path:
    """``out_dir/report.md`` (table, method, frontier) plus PNG plots; returns the Markdown file's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(results, out_dir) if results else []
    r0 = results[0] if results else None
    lines = ["# qconvert verify report", ""]
    if r0 is not None:
        lines += [(f"Reference perplexity {r0.ppl_ref:.4f} on {r0.n_windows} windows of {r0.ctx} tokens "
                  f"({r0.n_scored:,} scored positions: the second half of each window), token ids sha256 "
                  f"`{r0.tokens_sha256}`."), ""]
    lines += [markdown_table(results), ""]
    if status is not None:
        lines += ["Gates: " + ", ".join(f"{r.key}: {s}" for r, s in zip(results, status)), ""]
    if results:
        lines += ["Quality/size frontier (no other artifact is both smaller and closer to the reference): "
                  + ", ".join(r.key for r in frontier(results)), ""]
    lines += [f"![{p}]({p})" for p in plots] or ["(matplotlib is not installed: no plots; pip install matplotlib)"]
    lines += ["", ("KL is KL(reference ‖ artifact) per scored token, estimated from the reference's top-64 "
              "log-probabilities plus the remaining mass; |Δlogit| over those 64 tokens; bits per weight count the "
              "decoder-layer matrices.")]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
