"""Output files and directories: claimed, built under a temporary name, renamed on success, removed on failure.

Every writer goes through this module:

- ``claim_output(final)`` takes an exclusive ``flock`` on ``.NAME.lock`` beside ``final`` for the whole run, so
  a second qconvert run writing the same name fails at once instead of silently replacing the first one's file
  (the kernel drops the lock when a process dies, so a killed run never blocks the next one);
- ``check_not_inside(final, inputs)`` refuses an output that is, is inside, or contains a path the run reads;
- the content is written to ``.NAME.partial-PID`` (a file: ``atomic_output``; a directory: ``StagedDirectory``)
  and ``publish`` renames it into place, never over a file that appeared meanwhile unless ``force`` was given;
- temporaries that dead runs left beside the same name (``.NAME.partial-PID`` whose PID is gone) are removed.

A failed, interrupted (Ctrl-C, SIGTERM) or out-of-space run never leaves a partial file under the final name and
never touches an existing file unless ``force`` was given.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

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


def format_size(n: float) -> str:
    """``n`` bytes in the largest of GiB, MiB, KiB that keeps it >= 1 (``1.50 GiB``, ``12.00 MiB``, ``300 bytes``)."""
    unit = next(((s, u) for s, u in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")) if n >= s), None)
    return f"{n / unit[0]:.2f} {unit[1]}" if unit else f"{int(n)} bytes"


def check_free_space(final: Path, needed: int) -> None:
    """Fail before writing when ``final``'s file system has fewer than ``needed`` bytes free (plus 1% slack)."""
    free = shutil.disk_usage(Path(final).parent).free
    if needed * 1.01 > free:
        raise OutputError(
            f"{final} needs {format_size(needed)} but only {format_size(free)} is free on its file system; "
            "free some space or choose another --out-dir."
        )


def check_not_inside(final: Path, inputs: Iterable[Path | None]) -> None:
    """Refuse an output that is, is inside, or contains one of ``inputs`` (files or directories the run reads).

    Symlinks are resolved both ways: the directory entry the rename would replace (``final``'s resolved parent
    plus its name: a Hugging Face cache snapshot holds symlinks into ``blobs/``) and what ``final`` points to.
    """
    final = Path(final)
    entry = final.parent.resolve() / final.name
    outs = {entry, final.resolve()}
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        for out in outs:
            if out == src or out.is_relative_to(src) or src.is_relative_to(out):
                where = "is" if out == src else "is inside" if out.is_relative_to(src) else "contains"
                raise OutputError(f"the output {final} {where} the input {given}; writing it could destroy what this "
                                  "run reads. Choose an --output/--out-dir outside the input.")


# ------------------------------------------------------------------------------------------------------------
# The claim: one run per final name


_HELD: dict[Path, OutputClaim] = {}  # lock file -> the claim of this process that holds its descriptor
_GUARD = threading.Lock()


class OutputClaim:
    """An exclusive claim on ``final``: ``flock`` on ``.NAME.lock`` beside it, which holds the owner's PID.

    Re-entrant within one thread (a pipeline may claim early and its writer claim again: the lock goes when the
    last of them is released); another thread or process claiming the same name gets ``OutputError`` at once.
    """

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.lock = self.final.parent.resolve() / f".{self.final.name}.lock"
        self.released = False
        with _GUARD:
            owner = _HELD.get(self.lock)
            if owner is None:
                self.fd, self.thread, self.count = _lock_file(self.lock, self.final), threading.get_ident(), 1
                owner = _HELD[self.lock] = self
            elif owner.thread != threading.get_ident():
                raise OutputError(f"{final} is already being written by another thread of this process; choose "
                                  "another output.")
            else:
                owner.count += 1
        self.owner = owner

    def release(self) -> None:
        """Give this claim up (idempotent); the last release of a name unlinks the lock file, then unlocks it."""
        if self.released:
            return
        self.released = True
        owner = self.owner
        with _GUARD:
            owner.count -= 1
            if owner.count:
                return
            del _HELD[owner.lock]
            with contextlib.suppress(FileNotFoundError):
                owner.lock.unlink()  # while still locked: a waiter that opened it re-checks the path (_lock_file)
            os.close(owner.fd)

    def __enter__(self) -> OutputClaim:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def claim_output(final: Path) -> OutputClaim:
    """Claim ``final`` for this run (see ``OutputClaim``); use as ``with claim_output(out): ...``."""
    return OutputClaim(final)


def _lock_file(lock: Path, final: Path) -> int:
    """Open and ``flock`` ``lock`` without waiting; returns its descriptor, or raises naming the holder's PID.

    A lock file left by a killed run is simply taken over (its lock died with the process). A holder unlinks the
    file before unlocking it, so after locking we check that the path still names the file we locked.
    """
    import fcntl  # Unix only, like the release directory lock

    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)  # the output directory, as check_writable_target makes it
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {lock}: {e.strerror}; choose a writable --out-dir.") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"another qconvert run (pid {pid}) is writing {final}; wait for it or choose another "
                              "output.") from None
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            with contextlib.suppress(OSError):  # the PID is only for the message: a full disk must not fail here
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


# ------------------------------------------------------------------------------------------------------------
# Temporaries and the final rename


def partial_path(final: Path) -> Path:
    """``.NAME.partial-PID`` beside ``final``: unique while the claim is held, recognisable once its PID is gone."""
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def remove_dead_partials(final: Path) -> None:
    """Delete ``.NAME.partial-PID`` files and directories beside ``final`` whose process is gone (call under the
    claim: a live run writing this name would hold it)."""
    prefix = f".{final.name}.partial-"
    for p in final.parent.iterdir():
        pid = p.name[len(prefix):] if p.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def abandon_outputs() -> None:
    """Remove this process's temporaries and lock files for every name it holds, for a process that must end at
    once without unwinding (llama.cpp aborting inside a native call): nothing is published, nothing is left."""
    for owner in list(_HELD.values()):  # no _GUARD: the caller may be inside a thread that holds it
        tmp = partial_path(owner.final)
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        with contextlib.suppress(OSError):
            owner.lock.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def publish(tmp: Path, final: Path, *, force: bool) -> None:
    """Rename the finished ``tmp`` (a file or a directory) to ``final``; call it under ``final``'s claim.

    Without ``force`` a ``final`` that appeared meanwhile (another program, not a qconvert run: those are kept
    out by the claim) is never replaced: a file is hard-linked into place, which fails if the name exists.
    With ``force`` an existing file is replaced atomically; whatever a directory replaces is moved aside first
    and deleted after the rename.
    """
    appeared = OutputError(f"{final} appeared while it was being written; nothing was replaced. Pass --force to "
                           "overwrite it, or choose another output.")
    if not force:
        if tmp.is_file():
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise appeared from None
            except OSError:  # no hard links on this file system: check, then rename
                if os.path.lexists(final):
                    raise appeared from None
                os.replace(tmp, final)
            else:
                tmp.unlink()
            return
        if os.path.lexists(final):
            raise appeared
        os.rename(tmp, final)
        return
    old = None
    if tmp.is_dir() and os.path.lexists(final):  # a rename cannot replace a non-empty directory or a file with one
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _prepare(final: Path, force: bool, needed: int, inputs: Iterable[Path | None]) -> OutputClaim:
    """The checks every writer runs before any work, then the claim and the sweep of dead temporaries."""
    check_not_inside(final, inputs)
    check_writable_target(final, force=force)
    claim = claim_output(final)
    try:
        if not force and final.exists():  # created between the check and the claim
            check_writable_target(final, force=False)
        if needed:
            check_free_space(final, needed)
        remove_dead_partials(final)
    except BaseException:
        claim.release()
        raise
    return claim


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_output(final: Path, *, force: bool = False, needed: int = 0,
                  inputs: Iterable[Path | None] = ()) -> Iterator[Path]:
    """Claim ``final``, yield a temporary path beside it; on clean exit fsync it and ``publish`` it as ``final``.

    ``needed``: the bytes the file will take, when known up front; less free space fails before anything is written.
    ``inputs``: paths the run reads; an output that is, is inside or contains one of them is refused.
    """
    final = Path(final)
    claim = _prepare(final, force, needed, inputs)
    tmp = partial_path(final)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600 files; give the usual permissions
        publish(tmp, final, force=force)
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
        claim.release()


class StagedDirectory:
    """A directory output: claimed and checked like ``atomic_output``, built in ``tmp`` (``.NAME.partial-PID``),
    published by ``commit()``; ``discard()`` (idempotent, a no-op after ``commit``) removes it and the claim.
    """

    def __init__(self, final: Path, *, force: bool = False, needed: int = 0,
                 inputs: Iterable[Path | None] = ()) -> None:
        self.final, self.force = Path(final), force
        self.claim = _prepare(self.final, force, needed, inputs)
        self.tmp = partial_path(self.final)
        try:
            shutil.rmtree(self.tmp, ignore_errors=True)  # an earlier writer of this process that was not discarded
            self.tmp.mkdir()
        except BaseException:
            self.claim.release()
            raise

    def commit(self) -> Path:
        usual = _umask()
        os.chmod(self.tmp, 0o777 & ~usual)
        for root, dirs, files in os.walk(self.tmp):  # safetensors and tempfile create 0600 files / 0700 directories
            for d in dirs:
                os.chmod(Path(root) / d, 0o777 & ~usual)
            for f in files:
                if not (Path(root) / f).is_symlink():
                    os.chmod(Path(root) / f, 0o666 & ~usual)
        publish(self.tmp, self.final, force=self.force)
        self.claim.release()
        return self.final

    def discard(self) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.claim.release()
