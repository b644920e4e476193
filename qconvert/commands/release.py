"""``qconvert release RECIPE --out DIR``: every artifact of a recipe, verified, with model cards and a manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

COMMANDS = ("release",)

EPILOG = """\
examples:
  qconvert release recipes/demo.toml --out out/demo                 # offline, the project's demo model
  qconvert release recipes/qwen2.5.toml --out rel/ --only '*-7b-*'   # one size of the family
  qconvert release recipes/qwen2.5.toml --out rel/ --resume          # continue a killed run
  qconvert release recipes/qwen2.5.toml --out /shared/rel --executor ray --ray-address auto

For each model: resolve it and hash its files, one calibration pass shared by GPTQ and the GGUF importance
matrix (AWQ runs its own pass on the same tokens), one reference pass; then every artifact, verified in its own
runtime (llama.cpp, onnxruntime, dequantized forward) against that reference. Writes <out>/manifest.json
(sha256 of every file, source hashes, settings, metrics, pass/fail), timings.json, report.md and a model card in
each artifact. Exit status 1 when an artifact fails its thresholds, 2 on a bad recipe or input.

An existing release directory is continued with --resume (artifacts whose manifest entry matches their inputs
are kept) or --only (the selected artifacts are rebuilt). --executor ray runs the (model, format) matrix as Ray
tasks (GPUs for calibration when the cluster has them, CPUs for K-quants); --ray-address points at a running
cluster (e.g. auto, or ray://head:10001), whose nodes need qconvert installed and --out on a shared filesystem.
"""


def add_parsers(sub: Any, add_model_args: Any) -> None:
    p = sub.add_parser("release", help="run a release recipe: many models x formats, verified, with a manifest",
                       description="Turn a TOML recipe (recipes/*.toml) into verified artifacts, model cards, "
                                   "manifest.json and report.md, locally or on a Ray cluster.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=Path, help="the recipe (.toml)")
    p.add_argument("--out", type=Path, required=True, help="release directory")
    p.add_argument("--only", metavar="PATTERN",
                   help="only artifacts matching these shell patterns (comma-separated; matched against "
                        "'model/artifact', the artifact name, the format id, kind or GGUF preset)")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="in-process (default) or Ray tasks")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="connect to this Ray cluster (auto, HOST:PORT, ray://HOST:10001); default: start a local one")
    p.add_argument("--resume", action="store_true",
                   help="continue the release in --out: keep artifacts whose manifest entry matches, build the rest")
    p.add_argument("--quiet", action="store_true", help="no per-artifact progress lines")


def run(args: argparse.Namespace) -> int:
    from qconvert.commands.demo import fixture_model
    from qconvert.errors import UsageError
    from qconvert.release.runner import run_release, summary

    if args.ray_address and args.executor != "ray":
        raise UsageError("--ray-address goes with --executor ray.")
    outcome = run_release(args.recipe, args.out, only=args.only, executor=args.executor, resume=args.resume,
                          ray_address=args.ray_address, verbose=not args.quiet, fixtures=fixture_model)
    print(summary(outcome))
    print(f"manifest: {args.out / 'manifest.json'}; report: {args.out / 'report.md'}")
    for line in outcome.failures:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if outcome.failures else 0
