"""Loading llama.cpp's prebuilt CPU libraries from the ``llama-cpp-py-sync`` wheel, once per process.

The wheel (llama.cpp b11739) is labelled manylinux2014 but links four C23 libc entry points that appeared in
glibc 2.38 (``__isoc23_strtol``, ``__isoc23_strtoul``, ``__isoc23_strtoull``, ``__isoc23_sscanf``); they differ
from the pre-C23 functions only in accepting ``0b`` binary literals. On an older glibc (Debian 12 has 2.36) the
libraries are loaded from in-memory copies in which those imports are rebound to the pre-C23 functions; the
ggml dependencies are loaded first, globally, so libllama's ``DT_NEEDED`` entries resolve to the patched copies
by SONAME. Nothing on disk is changed. On a glibc >= 2.38 the files are loaded as they are.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import struct
import threading
from pathlib import Path
from typing import Any

from qconvert.errors import RuntimeMissingError

INSTALL_HINT = "install it with: pip install 'qconvert[llamacpp]' (the llama-cpp-py-sync wheel)"
GGML_LIBS = ("libggml-base.so.0", "libggml-cpu.so.0", "libggml-rpc.so.0", "libggml.so.0")  # dependency order
_LOCK = threading.Lock()
_LOADED: dict[str, Any] = {}
SHT_DYNSYM, SHT_GNU_VERSYM, SHT_GNU_VERNEED = 11, 0x6FFFFFFF, 0x6FFFFFFE
VER_FLG_WEAK = 0x2


def package_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp_py_sync")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeMissingError(f"llama.cpp's libraries are missing: llama-cpp-py-sync is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def without_glibc_238(elf: bytes) -> bytes:
    """Rebind ``__isoc23_<f>@GLIBC_2.38`` imports of an ELF64 LE shared object to ``<f>@GLIBC_2.2.5``.

    Three edits: each such symbol's name offset moves to the ``<f>`` suffix of the same string, its
    ``.gnu.version`` index becomes GLIBC_2.2.5's, and the GLIBC_2.38 requirement is flagged weak (optional).
    """
    buf = bytearray(elf)
    (shoff,) = struct.unpack_from("<Q", buf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", buf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", buf, shoff + i * shentsize) for i in range(shnum)]
    by_type = {s[1]: s for s in sections}  # sh_type -> section header
    dynsym, versym, verneed = by_type[SHT_DYNSYM], by_type[SHT_GNU_VERSYM], by_type[SHT_GNU_VERNEED]
    strtab = sections[dynsym[6]][4]  # .dynsym's sh_link -> .dynstr file offset

    def cstr(off: int) -> bytes:
        return bytes(buf[strtab + off: buf.index(0, strtab + off)])

    versions: dict[bytes, tuple[int, int]] = {}  # version name -> (index, file offset of its Vernaux)
    need = verneed[4]
    while True:
        _, cnt, _, aux, nxt = struct.unpack_from("<HHIII", buf, need)
        pos = need + aux
        for _ in range(cnt):
            _, _, index, name, anext = struct.unpack_from("<IHHII", buf, pos)
            versions[cstr(name)] = (index, pos)
            pos += anext
        if not nxt:
            break
        need += nxt
    if b"GLIBC_2.38" not in versions:
        return elf
    new_index, (old_index, old_aux) = versions[b"GLIBC_2.2.5"][0], versions[b"GLIBC_2.38"]
    prefix = b"__isoc23_"
    for i in range(dynsym[5] // 24):  # Elf64_Sym is 24 bytes, st_name first
        (name,) = struct.unpack_from("<I", buf, dynsym[4] + 24 * i)
        vpos = versym[4] + 2 * i
        if struct.unpack_from("<H", buf, vpos)[0] & 0x7FFF == old_index and cstr(name).startswith(prefix):
            struct.pack_into("<I", buf, dynsym[4] + 24 * i, name + len(prefix))
            struct.pack_into("<H", buf, vpos, new_index)
    struct.pack_into("<H", buf, old_aux + 4, VER_FLG_WEAK)  # Vernaux.vna_flags
    return bytes(buf)


def _glibc_too_old(path: Path) -> bool:
    try:
        ctypes.CDLL(str(path))
        return False
    except OSError as e:
        if "GLIBC_2.38" in str(e):
            return True
        raise RuntimeMissingError(f"cannot load {path} ({e}); reinstall llama-cpp-py-sync") from e


def _in_memory(path: Path) -> str:
    fd = os.memfd_create(path.name)  # stays open for the life of the process, like the mapping
    os.write(fd, without_glibc_238(path.read_bytes()))
    return f"/proc/self/fd/{fd}"


ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)  # ggml_abort_callback_t: void (*)(const char *)


def _on_abort(message: bytes | None) -> None:
    """Runs inside ``ggml_abort`` just before it calls ``abort()``: say what happened, remove this run's partial
    outputs and end the process with exit status 2 (the status of every refused input), since it cannot go on."""
    text = (message or b"").decode("utf-8", errors="replace").strip()
    os.write(2, (f"qconvert: error: llama.cpp stopped on an internal check: {text}\n"
                 "qconvert validates every GGUF before llama.cpp sees it, so this is a llama.cpp check qconvert does "
                 "not make yet; nothing was written. Please report it with the output of `qconvert info FILE`.\n"
                 ).encode())
    try:
        from qconvert.io.atomic import abandon_outputs
        abandon_outputs()
    finally:
        os._exit(2)  # abort() would follow: the process cannot return into llama.cpp


def _quiet_aborts(base: ctypes.CDLL) -> None:
    """An assert in ggml/llama.cpp would abort the process (SIGABRT): make it say why, clean up and exit 2 instead.

    ``_load_all`` also sets ``GGML_NO_BACKTRACE``: without it ggml's abort forks gdb onto this process to print a
    backtrace, which can hang for many minutes. ggml reads the variable at abort time.
    """
    if hasattr(base, "ggml_set_abort_callback"):  # feature check: older ggml builds lack it
        callback = ABORT_CALLBACK(_on_abort)
        base.ggml_set_abort_callback.restype = ctypes.c_void_p
        base.ggml_set_abort_callback.argtypes = [ABORT_CALLBACK]
        base.ggml_set_abort_callback(callback)
        _LOADED["abort_callback"] = callback  # keep it alive as long as the library


def _load_all() -> None:
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")  # before any ggml code runs; see _quiet_aborts
    root = package_dir()
    patch = _glibc_too_old(root / GGML_LIBS[0])
    for name in GGML_LIBS:
        target = _in_memory(root / name) if patch else str(root / name)
        _LOADED[name] = ctypes.CDLL(target, mode=ctypes.RTLD_GLOBAL)
    _quiet_aborts(_LOADED[GGML_LIBS[0]])
    try:
        from llama_cpp_py_sync._cffi_bindings import get_ffi
    except ImportError as e:
        raise RuntimeMissingError(f"llama-cpp-py-sync is broken ({e}); {INSTALL_HINT}") from e
    ffi = get_ffi()
    llama = root / "libllama.so.0"
    _LOADED["ffi"], _LOADED["llama"] = ffi, ffi.dlopen(_in_memory(llama) if patch else str(llama))


def ggml_base() -> ctypes.CDLL:
    """``libggml-base`` (quantize/dequantize row functions), the same copy libllama uses."""
    with _LOCK:
        if not _LOADED:
            _load_all()
        return _LOADED["libggml-base.so.0"]


def libllama() -> tuple[Any, Any]:
    """(ffi, lib) for libllama with the wheel's CFFI declarations."""
    with _LOCK:
        if not _LOADED:
            _load_all()
        return _LOADED["ffi"], _LOADED["llama"]
