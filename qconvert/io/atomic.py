"""Atomic output files: write to a temporary name beside the target, rename on success, delete on failure.

A failed, interrupted (Ctrl-C) or out-of-space run never leaves a partial file under the final name and never
touches an existing file unless ``force`` was given.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from qconvert.errors import OutputError


def check_writable_target(final: Path, *, force: bool) -> None:
    """Fail early (before any work) when ``final`` exists without ``force`` or its directory is not writable."""
    if final.exists() and not force:
        raise OutputError(f"{final} already exists; pass --force to overwrite it, or choose another --out-dir.")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {parent}: {e.strerror}; choose a writable --out-dir.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {parent} is not writable; choose a writable --out-dir.")


def check_free_space(final: Path, needed: int) -> None:
    """Fail before writing when ``final``'s file system has fewer than ``needed`` bytes free (plus 1% slack)."""
    free = shutil.disk_usage(Path(final).parent).free
    if needed * 1.01 > free:
        raise OutputError(
            f"{final} needs {needed / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free on its file system; "
            "free some space or choose another --out-dir."
        )


@contextlib.contextmanager
def atomic_output(final: Path, *, force: bool = False, needed: int = 0) -> Iterator[Path]:
    """Yield a temporary path in ``final``'s directory; on clean exit fsync it and rename it to ``final``.

    ``needed``: the bytes the file will take, when known up front; less free space fails before anything is written.
    """
    final = Path(final)
    check_writable_target(final, force=force)
    if needed:
        check_free_space(final, needed)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 files; give the usual permissions
        os.replace(tmp, final)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(
                f"no space left on the device while writing {final}; nothing was written under that name. "
                "Free some space or choose another --out-dir."
            ) from e
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
