"""GPTQModel's own GPTQ and AWQ on the same calibration tokens as qconvert's, for the quality table in the README.

    .venv/bin/python bench/bench_int4.py --methods rtn gptq awq gptqmodel-gptq gptqmodel-awq --anchor-python ORACLE/bin/python

runs both steps below for the gptqmodel-* rows and prints them beside qconvert's; by hand:

    .venv/bin/python bench/bench_gptqmodel.py dump [--model DIR] --samples 8 --seqlen 512  # tokens -> WORKDIR
    ORACLE/bin/python bench/bench_gptqmodel.py quantize gptq [--model DIR]                 # GPTQModel 7.6, CPU
    ORACLE/bin/python bench/bench_gptqmodel.py quantize awq [--model DIR]

``dump`` writes the windows qconvert's calibration uses (built-in set, seed 0: the same call as bench_int4's
children); ``quantize`` runs GPTQModel on exactly those windows with qconvert's default scheme for the method
(GPTQ: 4-bit, group 128, symmetric, desc_act False; AWQ: 4-bit, group 128, zero point, GEMM) and saves the
checkpoint to WORKDIR/gptqmodel-METHOD, which ``bench_int4.py --eval-only`` dequantizes and scores like
qconvert's own outputs. ORACLE is a venv with ``gptqmodel==7.6.*`` beside ``torch==2.13.0`` (scripts/test-oracles.sh
builds one as .venv-oracle). GPTQModel needs the 2-core workaround (``_default_cpu_workers``) on this machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied"


def dump(model: Path, ids_file: Path, samples: int, seqlen: int) -> None:
    from qconvert.calibset import load_calibration

    calib = load_calibration("builtin", model, chat=False, n_samples=samples, seq_len=seqlen, seed=0)
    ids_file.write_text(json.dumps(calib.ids.tolist()))
    print(f"wrote {calib.n_tokens} tokens ({calib.describe()}) to {ids_file}")


def quantize(model: Path, ids_file: Path, method: str, out: Path) -> dict:
    import os

    os.chdir(out.parent)  # GPTQModel writes its logs/ into the working directory
    import gptqmodel
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    gptqmodel._default_cpu_workers = lambda: 2  # dependency-probe.md: its worker pool needs this on <= 2 cores
    torch.set_num_threads(2)
    windows = json.loads(ids_file.read_text())
    data = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
    cfg = (QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False) if method == "gptq" else
           QuantizeConfig(bits=4, group_size=128, sym=False, quant_method="awq", format="gemm"))
    start = time.perf_counter()
    # bf16: GPTQModel's CPU default; its torch GPTQ/AWQ packers refuse float32 (they support fp16/bf16 only)
    m = GPTQModel.load(str(model), cfg, device="cpu", dtype=torch.bfloat16)
    m.quantize(data, batch_size=8, backend=BACKEND.TORCH)  # AUTO picks CUDA-only AWQ kernels
    tmp = out.with_name(out.name + ".partial")  # a failed or interrupted run leaves no half-written output
    shutil.rmtree(tmp, ignore_errors=True)
    m.save(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"method": f"gptqmodel-{method}", "seconds": time.perf_counter() - start,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "tokens": sum(len(w) for w in windows), "gptqmodel": gptqmodel.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["dump", "quantize"])
    ap.add_argument("method", nargs="?", choices=["gptq", "awq"], help="quantize: which GPTQModel method")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qconvert-bench-int4"))
    args = ap.parse_args()
    args.model, args.workdir = args.model.resolve(), args.workdir.resolve()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a checkpoint directory: build it with ../shared/tools/real-model.sh")
    args.workdir.mkdir(parents=True, exist_ok=True)
    ids_file = args.workdir / "calib_ids.json"
    if args.step == "dump":
        dump(args.model, ids_file, args.samples, args.seqlen)
        return
    if args.method is None:
        raise SystemExit("quantize needs a method: gptq or awq")
    if not ids_file.is_file():
        raise SystemExit(f"{ids_file} is missing: run `bench_gptqmodel.py dump` with qconvert's venv first")
    print(json.dumps(quantize(args.model, ids_file, args.method, args.workdir / f"gptqmodel-{args.method}")))


if __name__ == "__main__":
    main()
