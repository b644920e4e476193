"""Calibration options shared by ``gguf`` (importance matrix), ``gptq`` and ``awq``: data, statistics files, device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qconvert.commands.argtypes import MAX_BATCH, MAX_CALIB_SAMPLES, MAX_SEQLEN, int_range, positive_int
from qconvert.commands.argtypes import seed as seed_type

if TYPE_CHECKING:
    from qconvert.calibration.quantize import CalibrationSettings
    from qconvert.calibration.stats import CalibrationStats
    from qconvert.calibset import CalibrationSet


def add_calibration_args(p: argparse.ArgumentParser, *, default_calib: str | None, stats_help: str) -> None:
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default=default_calib, metavar="SOURCE",
                   help=("builtin" + (" (default, offline)" if default_calib else " (offline)") +
                         ", a .txt or .jsonl file; wikitext2/c4/pileval/hf:NAME need network"))
    c.add_argument("--calib-samples", type=positive_int(MAX_CALIB_SAMPLES, "calibration samples are held in memory at once"),
                    default=128, help="number of token windows (default 128)")
    c.add_argument("--calib-seqlen", type=int_range(2, MAX_SEQLEN, "Qwen2.5's longest context"),
                    default=512, help="tokens per window (default 512)")
    c.add_argument("--calib-format", choices=("auto", "chat", "raw"), default="auto",
                   help="render documents as conversations with the checkpoint's chat template, or use raw text "
                        "(auto: chat when the checkpoint ships a chat template)")
    c.add_argument("--seed", type=seed_type, default=0, help="sampling seed (same seed -> same tokens)")
    c.add_argument("--stats", type=Path, metavar="FILE", help=stats_help)
    c.add_argument("--save-stats", type=Path, metavar="FILE",
                   help="save the float model's calibration statistics (Hessians, activation means, importance "
                        "matrix; one float pass) for later --stats runs of gguf/gptq")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    r.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="forward dtype (auto: bfloat16 on GPU, float32 on CPU); float16 overflows on Qwen2")
    r.add_argument("--batch-size", type=positive_int(MAX_BATCH, "more samples per forward only runs out of memory"),
                    default=8, help="calibration samples per forward (default 8)")


def settings_from_args(args: argparse.Namespace) -> CalibrationSettings:
    from qconvert.calibration.quantize import CalibrationSettings, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return CalibrationSettings(device, resolve_dtype(args.dtype, device), args.batch_size)


def calibration_from_args(args: argparse.Namespace, model_dir: Path, model_name: str | None = None) -> CalibrationSet:
    """The calibration set of ``--calib*`` for ``model_dir``; chat or raw is decided by the checkpoint's files
    (``qconvert.calibset.uses_chat``), never by ``model_name`` (kept for callers; unused)."""
    from qconvert.calibset import load_calibration, uses_chat

    chat = uses_chat(model_dir, args.calib_format)
    calib = load_calibration(args.calib or "builtin", model_dir, chat=chat, n_samples=args.calib_samples,
                             seq_len=args.calib_seqlen, seed=args.seed)
    print(f"calibration: {calib.describe()}", file=sys.stderr)
    return calib


def layer_progress(label: str, quiet: bool) -> tuple[Any, list]:
    """A ``progress(done, total)`` callback drawing a tqdm bar on first call, and the list holding the bar."""
    bars: list = []

    def progress(done: int, total: int) -> None:
        if quiet:
            return
        if not bars:
            from tqdm import tqdm
            bars.append(tqdm(total=total, desc=label, unit="layer", file=sys.stderr))
        bars[0].update(done - bars[0].n)
    return progress, bars


def collect_and_save(args: argparse.Namespace, model_dir: Path, calib: CalibrationSet,
                     settings: CalibrationSettings, holdout: float | None = None) -> CalibrationStats:
    """One float pass over ``calib``, streamed into ``--save-stats`` when given (memory: about one layer).

    Without ``--save-stats`` no GPTQ Hessians are collected: the importance matrix needs only Σx² per column.
    ``holdout``: also keep the held-out windows' Hessians (the guard of a later ``qconvert gptq --stats``).
    """
    from qconvert.calibration.stats import collect_stats

    progress, bars = layer_progress("statistics", args.quiet)
    save = args.save_stats
    try:
        stats = collect_stats(model_dir, calib.ids, settings, progress, source=calib.describe(), path=save,
                              force=args.force, hessians=save is not None, holdout=holdout)
    finally:
        for bar in bars:
            bar.close()
    if save is not None:
        print(f"saved calibration statistics to {save}", file=sys.stderr)
    return stats


def load_stats(path: Path, model_dir: Path) -> CalibrationStats:
    from qconvert.calibration.stats import CalibrationStats

    stats = CalibrationStats.load(path)
    stats.check_model(model_dir)
    print(f"statistics: {path} ({stats.source or 'unknown source'})", file=sys.stderr)
    return stats
