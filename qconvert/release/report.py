"""The release's report.md: one table of every artifact, then the verify module's detail and plots.

Model cards are written by ``qconvert.card`` (``release_card``), called from ``qconvert.release.build``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_report(root: Path, manifest: dict[str, Any], timings: dict[str, Any]) -> Path:
    """report.md of the release: one table per model, the verify module's plots of all artifacts."""
    from qconvert.verify import ArtifactResult
    from qconvert.verify import write_report as verify_report

    arts = manifest["artifacts"]
    results, status = [], []
    for aid, e in arts.items():
        m = dict(e["metrics"])
        m = {k: (float(v) if v in ("nan", "inf", "-inf") else v) for k, v in m.items()}
        t = timings.get("artifacts", {}).get(aid, {})
        results.append(ArtifactResult.from_dict({**m, "name": aid.split("/")[-1], "kind": e["kind"], "dppl": m["dppl"],
                                                 "tokens_per_s": t.get("tokens_per_s") or 0.0}))
        status.append("PASS" if e["passed"] else "FAIL")
    path = verify_report(results, root, status)
    body = path.read_text(encoding="utf-8").split("\n", 1)[1]
    lines = [f"# Release report: {manifest['release'].get('name', '')}", "",
             (f"qconvert {manifest['release'].get('qconvert_version', '')}; {len(arts)} artifacts, "
              f"{sum(not e['passed'] for e in arts.values())} failing their thresholds."), "",
             "| artifact | kind | bits/weight | bytes | ΔPPL % | mean KL | top-1 | gate |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for aid, e in arts.items():
        m = e["metrics"]
        lines.append(f"| {aid} | {e['kind']} | {e['bits_per_weight']:.3f} | {e['size_bytes']:,} | {m['dppl_pct']:+.3f} | "
                     f"{m['kl_mean']:.5f} | {100 * m['top1']:.1f}% | {'PASS' if e['passed'] else 'FAIL: ' + '; '.join(e['failures'])} |")
    lines += ["", "## Verification detail"]
    tmp = path.with_name(".report.md.partial")
    tmp.write_text("\n".join(lines) + "\n" + body, encoding="utf-8")
    tmp.replace(path)
    return path
