"""The build: ``CMakeLists.txt`` builds the same ``kfuse._C`` as ``setup.py``, from the same source
list (``csrc/sources.txt``), and kfuse loads and runs it. (The suite itself runs on the setup.py
build, which ``make test`` makes; nothing else would notice the CMake build breaking.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cuda_emu import host_compiler

ROOT = Path(__file__).resolve().parents[1]

# Run in a copy of the package whose extension is the CMake build, with csrc/ beside it, so that
# kfuse's stale-build check compares the hash CMake compiled in with the tree's.
CHECK = """
import torch, kfuse, kfuse._C
from kfuse.reference.deu import deu_reference
assert kfuse._C.__file__.startswith({pkg!r}), kfuse._C.__file__
assert kfuse.availability()["cpu"] == "available", kfuse.availability()
x = torch.randn(37, 19, dtype=torch.float64, requires_grad=True)
c = torch.rand(19, 5, dtype=torch.float64, requires_grad=True)
y = kfuse.deu(x, c, backend="cpu")
torch.testing.assert_close(y, deu_reference(x, c))
got = torch.autograd.grad(y.sum(), (x, c))
want = torch.autograd.grad(deu_reference(x, c).sum(), (x, c))
torch.testing.assert_close(got, want)
print("cmake build ok")
"""


def _cuda_toolkit_root() -> str | None:
    """A CUDA toolkit root for Torch's CMake config, which a CUDA torch needs even for CPU code."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return root
    return None


def test_cmake_builds_the_extension(tmp_path: Path) -> None:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # pip's ninja
    cmake, ninja = shutil.which("cmake", path=path), shutil.which("ninja", path=path)
    if cmake is None or ninja is None:
        pytest.skip("cmake or ninja is not installed")
    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda:
        if (root := _cuda_toolkit_root()) is None:
            pytest.skip("Torch's CMake config needs a CUDA toolkit (CUDA_HOME) for a CUDA build of torch")
        configure.append(f"-DCUDA_TOOLKIT_ROOT_DIR={root}")
    # A CUDA torch's CMake config try-runs a GPU detection unless TORCH_CUDA_ARCH_LIST is set,
    # which CMake 3.25 cannot compile for CUDA 13 ("CUDA20 ... not supported"); the CPU-only
    # build needs no architectures.
    env = {"TORCH_CUDA_ARCH_LIST": "9.0", **os.environ, "PATH": path}
    for cmd in (configure, [cmake, "--build", str(build), "-j", str(os.cpu_count() or 1)]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    (built,) = build.glob("_C*.so")
    pkg = tmp_path / "python" / "kfuse"
    shutil.copytree(ROOT / "python" / "kfuse", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy(built, pkg / built.name)
    (tmp_path / "csrc").symlink_to(ROOT / "csrc")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "python")}
    done = subprocess.run([sys.executable, "-c", CHECK.format(pkg=str(pkg))], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "cmake build ok" in done.stdout, done.stderr[-4000:]


def test_kfuse_cuda_takes_only_0_1_or_unset() -> None:
    """KFUSE_CUDA=false (off, no) meant "auto" and built the CUDA kernels where nvcc is (bug hunt)."""
    for value in ("false", "off", "2"):
        out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "KFUSE_CUDA": value})
        assert out.returncode != 0 and "KFUSE_CUDA must be 1" in out.stderr + out.stdout, (value, out.stderr)


def test_sdist_holds_what_the_build_and_tests_read(tmp_path: Path) -> None:
    """An sdist built from a copy of this tree's files (tracked, or new and not ignored: no build
    leftovers such as an egg-info, whose SOURCES.txt setuptools would reuse) has every file git
    tracks under csrc/ (sources.txt, headers, the CUDA source), CMakeLists.txt and tests/:
    setuptools alone put only the extension's .cpp files in it, and installing it failed on
    csrc/sources.txt (packaging hunt, 2026-12-04)."""
    ls = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                        capture_output=True, text=True, check=False)
    if ls.returncode != 0:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for name in ls.stdout.split("\n"):
        if name and (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "KFUSE_CUDA": "0"}
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist"), "--formats=tar"],
                   cwd=src, env=env, check=True, capture_output=True)
    (tar,) = (tmp_path / "dist").glob("kfuse-*.tar")
    import tarfile  # noqa: PLC0415

    with tarfile.open(tar) as f:
        names = {n.split("/", 1)[1] for n in f.getnames() if "/" in n}
    wanted = {n for n in ls.stdout.split() if n.startswith(("csrc/", "tests/")) or n == "CMakeLists.txt"}
    missing = sorted(wanted - names)
    assert not missing, f"missing from the sdist: {missing}"


# A compiler whose C++ has no _Float16 (aarch64 GCC 12, Debian 12's; clang 14) failed the build
# with "'_Float16' does not name a type" (portability hunt, 2026-12-06). KFUSE_NO_FLOAT16 selects the form
# such compilers get (cpu_convert.h's Half as a struct of bits), and the prelude defines _Float16 away after
# the compiler's own headers that use it, so that any other use of the type in csrc/ is an error here, as it
# would be there.
_PRELUDE = """
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#define _Float16 kfuse_compiler_without_Float16
"""
_CPU_SOURCES = [line for line in (ROOT / "csrc" / "sources.txt").read_text().split("\n")
                if line.endswith(".cpp") and line != "csrc/bindings.cpp"]  # (bindings: torch's headers)


def _without_float16(cxx: str, tmp_path: Path) -> list[str]:
    """The flags of a build as a compiler without _Float16 would see it."""
    prelude = tmp_path / "no_float16.h"
    prelude.write_text(_PRELUDE)
    return [cxx, "-std=c++20", "-DKFUSE_NO_FLOAT16", "-include", str(prelude)]


@pytest.mark.parametrize("source", _CPU_SOURCES)
def test_cpu_kernels_compile_where_cxx_has_no_float16(source: str, tmp_path: Path) -> None:
    cmd = [*_without_float16(host_compiler(), tmp_path), "-fopenmp", "-fsyntax-only", "-Wno-psabi", str(ROOT / source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"


_CONVERT = r"""
#include <cstdio>
#include "cpu_convert.h"
using namespace kfuse::cpu;
int main() {
  for (uint32_t h = 0; h < 65536; ++h) {  // every half to float
    const uint16_t b = uint16_t(h);
    Half v;
    std::memcpy(&v, &b, 2);
    const uint32_t f = as_bits(to_acc(v));
    std::fwrite(&f, 4, 1, stdout);
  }
  uint32_t f;
  while (std::fread(&f, 4, 1, stdin) == 1) {  // floats to half
    const Half v = from_acc<Half>(as_float(f));
    std::fwrite(&v, 2, 1, stdout);
  }
}
"""


def test_struct_half_converts_as_torch(tmp_path: Path) -> None:
    """The struct form of Half converts every half to float, and floats of every kind (edge_floats) to
    half, bit for bit as torch does (nan: a nan)."""
    src, exe = tmp_path / "convert.cpp", tmp_path / "convert"
    src.write_text(_CONVERT)
    cmd = [*_without_float16(host_compiler(), tmp_path), "-O2", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    from test_embedding import edge_floats  # noqa: PLC0415

    floats = edge_floats(20000)
    out = subprocess.run([str(exe)], input=floats.numpy().tobytes(), capture_output=True, timeout=60, check=True).stdout
    halves = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    got = torch.frombuffer(bytearray(out[: 4 * 65536]), dtype=torch.float32)
    want = halves.float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32))
    got = torch.frombuffer(bytearray(out[4 * 65536:]), dtype=torch.float16)
    want = floats.half()
    assert got.numel() == floats.numel()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0).view(torch.int16), want.nan_to_num(0.0).view(torch.int16))
