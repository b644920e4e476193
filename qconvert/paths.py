"""Where qconvert keeps its caches: one root, one sub-directory per kind of cached thing.

    ~/.cache/qconvert/fixtures   built fixture and demo checkpoints ($QCONVERT_FIXTURE_CACHE moves it)
    ~/.cache/qconvert/verify     reference summaries of ``qconvert verify`` (next to the fixtures)

Product code asks here, not the fixtures package, for these directories.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "QCONVERT_FIXTURE_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$QCONVERT_FIXTURE_CACHE``, else ``~/.cache/qconvert/fixtures``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "qconvert" / "fixtures"


def verify_cache_dir() -> Path:
    """Default cache of reference summaries: ``verify/`` next to the fixture cache (``cache_root().parent``)."""
    return cache_root().parent / "verify"
