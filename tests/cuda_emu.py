"""Run an op's CUDA kernels on the CPU: compile its ``.cu`` files with the host C++ compiler
against ``tests/cuda_emu/include`` (an emulator of the CUDA execution model, see its
``cuda_runtime.h``) and load the result with ctypes.

This tests what the GPU tests would catch in the kernels' own logic (indexing, tiling, bounds,
warp and block reductions, workspace sizes, launch configurations) on machines without a GPU,
the way ``TRITON_INTERPRET=1`` tests the Triton kernels. Device math is the host's (libm), so
it says nothing about the hardware approximations, nor about speed.

Rewrites make CUDA source valid C++, all mechanical: ``k<<<cfg>>>(args)`` becomes
``::kfemu::launch(::kfemu::Config(cfg), k, args)``; ``extern __shared__ T name[];`` becomes a
pointer to the launch's dynamic shared memory; ``__shared__ T name[n];`` becomes a reference to
a per-block area. A syntax they miss fails to compile. An op adds ``tests/cuda_emu/<op>.cpp``
with its ``KFEMU_API`` entry points. Builds are cached under ``build/cuda_emu`` by content hash
(``make clean`` empties it).
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMU = Path(__file__).resolve().parent / "cuda_emu"
CACHE = ROOT / "build" / "cuda_emu"

_KERNEL = re.compile(r"([A-Za-z_][\w:]*(?:<(?:[^<>;]|<[^<>;]*>)*>)?)\s*<<<")
# One declaration per line; anything else stays `__shared__`, which then fails to compile.
_DYNAMIC_SHARED = re.compile(
    r"extern[ \t]+__shared__[ \t]+(?:__align__\([^)\n]*\)[ \t]+)?([^;=\[\n]+?)[ \t]+(\w+)[ \t]*\[[ \t]*\][ \t]*;")
_STATIC_SHARED = re.compile(
    r"(?:\bstatic[ \t]+)?__shared__[ \t]+(?:__align__\([^)\n]*\)[ \t]+)?([^;=\[\n]+?)[ \t]+(\w+)[ \t]*"
    r"((?:\[[^\]\n]*\][ \t]*)*);")


def _mask(text: str) -> str:
    """``text`` with the insides of comments and string/character literals blanked (newlines
    kept, same length), so that the rewrites never match there."""
    out, i, n = list(text), 0, len(text)
    while i < n:
        if text.startswith("//", i):
            start, end = i, text.find("\n", i)
            end = nxt = n if end < 0 else end
        elif text.startswith("/*", i):
            start, end = i, text.find("*/", i + 2)
            end = nxt = n if end < 0 else end + 2
        elif text[i] in "\"'":
            end = i + 1
            while end < n and text[end] not in (text[i], "\n"):
                end += 2 if text[end] == "\\" else 1
            start, nxt = i + 1, end + 1  # the quotes stay
        else:
            i += 1
            continue
        for k in range(start, min(end, n)):
            if out[k] != "\n":
                out[k] = " "
        i = nxt
    return "".join(out)


def _matching_paren(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses after offset {open_at}")


def _rewrite_launches(text: str) -> str:
    masked = _mask(text)
    out, pos = [], 0
    for m in _KERNEL.finditer(masked):
        if m.start() < pos:
            continue
        cfg_end = masked.index(">>>", m.end())
        args_open = cfg_end + 3
        while masked[args_open].isspace():
            args_open += 1
        if masked[args_open] != "(":
            raise ValueError(f"no argument list after the launch of {m.group(1)}")
        args_close = _matching_paren(masked, args_open)
        args = text[args_open + 1 : args_close]  # line breaks kept: later lines keep their numbers
        cfg = text[m.end() : cfg_end]
        out.append(text[pos : m.start()])
        out.append(f"::kfemu::launch(::kfemu::Config({cfg}), {m.group(1)}{', ' + args if args.strip() else ''})")
        pos = args_close + 1
    return "".join(out) + text[pos:]


def _substitute(pattern: re.Pattern, template: str, text: str) -> str:
    out, pos = [], 0
    for m in pattern.finditer(_mask(text)):
        out += [text[pos : m.start()], m.expand(template)]
        pos = m.end()
    return "".join(out) + text[pos:]


def rewrite(source: str) -> str:
    """CUDA source -> C++ for the emulator (the rewrites in the module docstring)."""
    text = _rewrite_launches(source)
    text = _substitute(_DYNAMIC_SHARED, r"\1* \2 = ::kfemu::dynamic_shared<\1>();", text)
    return _substitute(_STATIC_SHARED, r"auto& \2 = ::kfemu::static_shared<\1\3, __COUNTER__>();", text)


def host_compiler() -> str:
    """The host C++ compiler the tests build with (also tests/test_build.py's): $CXX, else c++ or g++."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("the tests need a host C++ compiler (set CXX)")
    return cxx


def load(op: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (or reuse) and load the emulated CUDA kernels of ``csrc/<op>`` with their entry
    points ``tests/cuda_emu/<op>.cpp``.

    ``defines`` are extra ``-D`` flags (``NAME=VALUE``), e.g. a kernel's tuning knobs.
    """
    cu_files = sorted((ROOT / "csrc" / op).glob("*.cu"))
    if not cu_files:
        raise FileNotFoundError(f"no .cu files under csrc/{op}")
    return build(op, cu_files, [EMU / f"{op}.cpp"], [ROOT / "csrc" / op, ROOT / "csrc"], defines)


def build(name: str, cu_files: list[Path], cpp_files: list[Path], include_dirs: list[Path],
          defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Rewrite ``cu_files``, compile them with ``cpp_files`` and the emulator, load the result."""
    flags = ["-std=c++17", "-O1", "-g0", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread",
             "-DKFUSE_WITH_CUDA", *(f"-D{d}" for d in defines)]
    cxx = host_compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256("\0".join([cxx, version, *flags]).encode())
    inputs = [Path(__file__), *cu_files, *cpp_files, EMU / "runtime.cpp", *sorted((EMU / "include").glob("*"))]
    inputs += sorted(h for d in include_dirs for h in d.rglob("*") if h.suffix in (".h", ".cuh", ".hpp"))
    for path in inputs:
        digest.update(path.read_bytes())
    out_dir = CACHE / f"{name}-{digest.hexdigest()[:16]}"
    lib = out_dir / f"{name}.so"
    if not lib.exists():
        # Built in a private folder, then moved in whole: concurrent builds never share files.
        CACHE.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=CACHE))
        srcs = []
        for cu in cu_files:
            dst = work / (cu.stem + ".cpp")
            dst.write_text(f'#line 1 "{cu}"\n' + rewrite(cu.read_text()))
            srcs.append(str(dst))
        cmd = [
            cxx, *flags, f"-I{EMU / 'include'}", *(f"-I{d}" for d in include_dirs),
            str(EMU / "runtime.cpp"), *map(str, cpp_files), *srcs, "-o", str(work / lib.name),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            shutil.rmtree(work, ignore_errors=True)
            raise RuntimeError(f"cuda_emu: building {name} failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
        try:
            work.rename(out_dir)
        except OSError:  # another process finished the same build first
            shutil.rmtree(work, ignore_errors=True)
    return ctypes.CDLL(str(lib))


def check(status: bytes | None) -> None:
    """Raise the error an entry point returned (``nullptr`` means success)."""
    if status is not None:
        raise RuntimeError(status.decode())


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


_PAGE = mmap.PAGESIZE
_BAND = 256  # bytes of guard band, at least, on the side of the buffer away from its page
_GUARD_BYTE = 0xFF  # NaN in every float format, so reading a band shows in the results
_libc = ctypes.CDLL(None, use_errno=True)


class Guarded:
    """A buffer to pass an emulated kernel: ``view`` holds ``numel`` elements of ``dtype``, NaN
    at first (so an output element left unwritten fails the comparison). It lies between two
    inaccessible pages, flush (within 16 bytes, keeping 16-byte alignment) against the one
    after it, or with ``at_start`` the one before it: an access 16 bytes or more past that
    side faults, and the test process dies with a Python traceback at the kernel call. The
    bytes between the view and the pages are guard bands of 0xff: reading one gives NaN, and
    ``check`` fails if a kernel wrote there. ``shift`` moves the view ``shift`` elements
    (fewer than 16 bytes) off 16-byte alignment."""

    def __init__(self, numel: int, dtype: torch.dtype, shift: int = 0, at_start: bool = False) -> None:
        esize = torch.empty(0, dtype=dtype).element_size()
        if not 0 <= shift * esize < 16:
            raise ValueError(f"shift={shift} must move the view by 0 to 15 bytes")
        nbytes = numel * esize
        span = -(-(_BAND + nbytes + 32) // _PAGE) * _PAGE
        self._map = mmap.mmap(-1, span + 2 * _PAGE)
        self._raw = torch.frombuffer(self._map, dtype=torch.uint8)
        base = self._raw.data_ptr()
        for page in (base, base + _PAGE + span):
            if _libc.mprotect(ctypes.c_void_p(page), ctypes.c_size_t(_PAGE), 0) != 0:
                raise OSError(ctypes.get_errno(), "cuda_emu: mprotect of a guard page failed")
        end = _PAGE + span  # offset of the second inaccessible page
        if at_start:
            self._start = _PAGE + shift * esize
        else:
            self._start = (end - nbytes - shift * esize) // 16 * 16 + shift * esize
        self._end = self._start + nbytes
        self._raw[_PAGE : self._start].fill_(_GUARD_BYTE)
        self._raw[self._end : end].fill_(_GUARD_BYTE)
        self.view = self._raw[self._start : self._end].view(dtype)
        self.view.fill_(float("nan"))

    def check(self, what: str) -> None:
        """Fail if a kernel wrote into the guard bands around ``view``."""
        for band in (self._raw[_PAGE : self._start], self._raw[self._end : len(self._raw) - _PAGE]):
            assert (band == _GUARD_BYTE).all(), f"{what}: a kernel wrote outside its buffer"
