"""Wall time of ``qconvert release``: the demo recipe locally and through Ray, and a small release of a real
checkpoint against the individual commands run one after another.

    python bench/bench_release.py demo [--ray]          # recipes/demo.toml, local (and Ray, 2 CPUs)
    python bench/bench_release.py real [MODEL_DIR]      # GGUF Q4_K_M + Q5_K_M + Q8_0, GPTQ-4, AWQ, ONNX int4
                                                        # (default ~/.cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied)

Every run is a fresh ``qconvert`` process (imports included) in a new temporary directory. The real-model
comparison gives both sides the same work: the same calibration tokens (--samples x --seqlen of the built-in set),
GGUFs without an importance matrix, GPTQ 4-bit g128, AWQ, ONNX int4 from the GPTQ checkpoint, and verification
of all six artifacts on the same evaluation windows (``qconvert verify`` with one reference pass for the
individual commands). What differs is what the release shares: GPTQ is quantized from the statistics pass
instead of its own layer-by-layer pass.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied"


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}; see {log}")
    return seconds


def qconvert(*args: str) -> list[str]:
    return [sys.executable, "-m", "qconvert", *args]


def bench_demo(ray: bool, work: Path) -> dict:
    log = work / "demo.log"
    out: dict = {"local_s": timed(qconvert("release", "recipes/demo.toml", "--out", str(work / "local"), "--quiet"), log)}
    if ray:
        code = ("import ray, sys; from pathlib import Path; from qconvert.release import run_release; "
                "from qconvert.fixtures import fixture_path; "
                "run_release('recipes/demo.toml', Path(sys.argv[1]), executor='ray', verbose=False, "
                "fixtures=fixture_path, ray_init={'num_cpus': 2, 'include_dashboard': False}); ray.shutdown()")
        out["ray_s"] = timed([sys.executable, "-c", code, str(work / "ray")], log)
        out["same_manifest"] = (work / "local/manifest.json").read_bytes() == (work / "ray/manifest.json").read_bytes()
    return out


REAL_RECIPE = """
[release]
name = "bench-small"
threads = 2
device = "cpu"

[calibration]
samples = {samples}
seq_len = {seqlen}
format = "raw"

[evaluation]
ctx = 512
chunks = {chunks}

[[models]]
path = "{model}"
name = "qwen2.5-coder-0.5b-tied"

[[formats]]
kind = "gguf"
presets = ["Q4_K_M", "Q5_K_M", "Q8_0"]

[[formats]]
kind = "gptq"
id = "gptq-int4"
bits = 4

[[formats]]
kind = "awq"

[[formats]]
kind = "onnx"
precision = "int4"
from = "gptq-int4"
"""


def bench_real(model: Path, work: Path, samples: int, seqlen: int, chunks: int, part: str = "both") -> dict:
    log = work / "real.log"
    out: dict = {}
    if part in ("both", "release"):
        recipe = work / "small.toml"
        recipe.write_text(textwrap.dedent(REAL_RECIPE).format(model=model, samples=samples, seqlen=seqlen,
                                                              chunks=chunks))
        out["release_s"] = timed(qconvert("release", str(recipe), "--out", str(work / "release"), "--quiet"), log)
        out["release_timings"] = json.loads((work / "release/timings.json").read_text())
    if part in ("both", "individual"):
        out.update(_individual(model, work, samples, seqlen, chunks, log))
    return out


def _individual(model: Path, work: Path, samples: int, seqlen: int, chunks: int, log: Path) -> dict:
    d = work / "individual"
    calib = ["--calib", "builtin", "--calib-samples", str(samples), "--calib-seqlen", str(seqlen),
             "--calib-format", "raw", "--device", "cpu", "--quiet"]
    steps = {}
    for preset in ("Q4_K_M", "Q5_K_M", "Q8_0"):
        steps[f"gguf {preset}"] = timed(qconvert("gguf", "--model", str(model), "--type", preset, "--out-dir", str(d),
                                                 "--quiet"), log)
    steps["gptq"] = timed(qconvert("gptq", "--model", str(model), *calib, "--out-dir", str(d), "--no-eval"), log)
    steps["awq"] = timed(qconvert("awq", "--model", str(model), *calib, "--out-dir", str(d), "--no-eval"), log)
    gptq_dir = next(d.glob("*-gptq-int4"))
    steps["onnx int4 --from gptq"] = timed(qconvert("onnx", "--model", str(model), "--precision", "int4", "--from",
                                                    str(gptq_dir), "--out-dir", str(d), "--quiet"), log)
    artifacts = sorted(str(p) for p in d.iterdir() if not p.name.startswith("."))
    steps["verify (6 artifacts)"] = timed(qconvert("verify", "--reference", str(model), "--ctx", "512", "--chunks",
                                                   str(chunks), "--cache-dir", str(work / "vcache"), "--quiet",
                                                   *artifacts), log)
    return {"individual_s": sum(steps.values()), "individual_steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("demo", "real"))
    p.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--ray", action="store_true", help="demo: also run it through a local Ray instance")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--part", choices=("both", "release", "individual"), default="both",
                   help="real: run only one side (e.g. both sides in parallel under the same machine load)")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--keep", action="store_true", help="keep the artifacts (several GB for 'real'); deleted by default")
    args = p.parse_args()
    if args.what == "real" and not (args.model / "config.json").is_file():
        print(f"skipped: {args.model} is not a checkpoint directory (build it with ../shared/tools/real-model.sh)")
        return
    work = Path(tempfile.mkdtemp(prefix="qconvert-bench-release-"))
    try:
        if args.what == "demo":
            result = bench_demo(args.ray, work)
        else:
            result = bench_real(args.model, work, args.samples, args.seqlen, args.chunks, args.part)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["workdir"] = str(work) if args.keep else "(deleted; --keep keeps it)"
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
