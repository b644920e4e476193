"""Keep numba's on-disk kernel cache consistent with all of this package's sources.

numba keys a cached function on its *own* file only. A kernel in ``kquants.py`` has the helpers of
``cfloat.py`` and ``ksearch.py`` compiled into it, so after an edit to one of those it would be loaded from
the cache with the old helpers -- silently wrong bytes in a development checkout. This drops the package's
cache files whenever any source here changed. Installed releases replace all files at once, so for them it
only costs one stat per file at import.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_STAMP = "qconvert-jit-sources.stamp"


def drop_stale_cache(package_dir: Path = _HERE) -> bool:
    """Delete numba cache files (``__pycache__/*.nbi``, ``*.nbc``) if the sources changed; True if it did."""
    stats = [(p.name, p.stat()) for p in sorted(package_dir.glob("*.py"))]
    stamp = hashlib.sha1(";".join(f"{n}:{s.st_mtime_ns}:{s.st_size}" for n, s in stats).encode()).hexdigest()
    cache = package_dir / "__pycache__"
    try:
        if (cache / _STAMP).read_text() == stamp:
            return False
    except OSError:
        pass  # no stamp yet
    try:
        for f in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:
            f.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        (cache / _STAMP).write_text(stamp)
    except OSError:
        return False  # read-only install: numba caches elsewhere, and releases ship all files together
    return True
