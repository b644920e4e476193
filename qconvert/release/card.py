"""Model cards (Hugging Face README.md with YAML front matter) and the release's report.md.

Cards hold no wall times, so an artifact's README is as deterministic as its weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qconvert import __version__

if TYPE_CHECKING:
    from qconvert.release.build import ModelContext
    from qconvert.release.plan import Job
    from qconvert.release.recipe import Recipe

LIBRARY = {"gguf": "gguf", "gptq": "transformers", "awq": "transformers", "onnx": "onnxruntime-genai"}
USAGE = {
    "gguf": "llama-cli -m {file} -cnv    # or: ollama / LM Studio / llama-cpp-python",
    "gptq": "vllm serve ./{name} --quantization gptq_marlin    # transformers: needs gptqmodel + optimum",
    "awq": "vllm serve ./{name} --quantization awq_marlin    # transformers: needs gptqmodel + optimum",
    "onnx": "python -c \"import onnxruntime_genai as og; og.Model('./{name}')\"",
}


def _title(job: Job) -> str:
    base = job.model.name.split("/")[-1]
    s = job.fmt.settings
    if job.fmt.kind == "gguf":
        return f"{base} — GGUF {job.preset}"
    if job.fmt.kind == "gptq":
        return f"{base} — GPTQ Int{s.get('bits', 4)}"
    if job.fmt.kind == "awq":
        return f"{base} — AWQ"
    return f"{base} — ONNX {s.get('precision', 'int4')}"


def front_matter(recipe: Recipe, job: Job, ctx: ModelContext) -> str:
    tags = ["qconvert", job.fmt.kind, "quantized", *( [job.preset.lower()] if job.preset else []),
            *recipe.release["tags"]]
    lines = ["---", f"base_model: {job.model.name}", f"quantized_by: {recipe.release['quantized_by']}",
             f"library_name: {LIBRARY[job.fmt.kind]}", f"license: {ctx.source.license}",
             "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in dict.fromkeys(tags)] + ["---"]
    return "\n".join(lines)


def model_card(recipe: Recipe, job: Job, ctx: ModelContext, entry: dict[str, Any]) -> str:
    """README.md of one artifact: front matter, files with sha256, settings, calibration, measured quality."""
    m, th = entry["metrics"], entry["thresholds"]
    files = "\n".join(f"| `{Path(k).name}` | {v['size']:,} | `{v['sha256']}` |" for k, v in entry["files"].items())
    settings = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in entry["settings"].items())
    calib = entry["calibration"]
    calib_text = (f"{calib['description']} (token sha256 `{calib['sha256']}`); statistics: {entry['statistics']}"
                  if calib else "none (this format needs no calibration data)")
    revision = f" at revision `{ctx.source.revision}`" if ctx.source.revision else ""
    origin = (f"[{job.model.name}](https://huggingface.co/{ctx.source.repo_id})" if ctx.source.repo_id
              else f"`{job.model.name}`")
    verdict = "PASS" if entry["passed"] else "FAIL (" + "; ".join(entry["failures"]) + ")"
    main_file = next(iter(entry["files"]))
    return f"""{front_matter(recipe, job, ctx)}

# {_title(job)}

Made by `qconvert release` (qconvert {__version__}, recipe `{recipe.release['name']}`) from
{origin}{revision}. The release's `manifest.json` lists the
source checkpoint's file hashes and every setting below.

## Files

| file | bytes | sha256 |
|---|---:|---|
{files}

Bits per weight (decoder matrices): {entry['bits_per_weight']:.3f}.

## Settings

| setting | value |
|---|---|
{settings}

## Calibration

{calib_text}

## Measured quality

Against the float source on {ctx.eval_info['n_tokens']:,} tokens of held-out text ({ctx.eval_info['source']},
sha256 `{ctx.eval_info['sha256']}`), {ctx.eval_info['windows']} windows of {ctx.eval_info['ctx']} tokens, run in
{m['runtime']}:

| perplexity (float → this) | ΔPPL | mean KL | top-1 agreement |
|---|---:|---:|---:|
| {m['ppl_ref']:.4f} → {m['ppl']:.4f} | {m['dppl_pct']:+.3f}% | {m['kl_mean']:.5f} | {100 * m['top1']:.2f}% |

Gate: ΔPPL ≤ {th['max_dppl_pct']:.3f}%, mean KL ≤ {th['max_kl']:.5f}: **{verdict}**.

## Use

```
{USAGE[job.fmt.kind].format(file=Path(main_file).name, name=job.name)}
```
"""


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
