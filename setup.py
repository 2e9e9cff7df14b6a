"""Builds kfuse and its extension ``kfuse._C``.

CPU kernels are always built. CUDA kernels are built when nvcc and a CUDA build of torch
are present; ``KFUSE_CUDA=1`` forces them (CI does, so CUDA sources always compile) and
``KFUSE_CUDA=0`` skips them. The source list is csrc/sources.txt, shared with CMakeLists.txt.
"""

import glob
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _find_cuda_home() -> None:
    # torch guesses CUDA_HOME from `which nvcc`; where nvcc is a wrapper script that guess is
    # wrong (it fails to link -lcudart), so prefer a real toolkit directory when there is one.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for cand in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = cand
            return


_find_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _load_sources_module():
    spec = importlib.util.spec_from_file_location("_kfuse_sources", ROOT / "python/kfuse/_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _source_list() -> list[str]:
    lines = (ROOT / "csrc/sources.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _want_cuda() -> bool:
    flag = os.environ.get("KFUSE_CUDA", "").strip()
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag not in ("", "0", "1"):  # "false", "off" meant auto, and built CUDA kernels (bug hunt)
        sys.exit(f"KFUSE_CUDA must be 1 (build the CUDA kernels), 0 (skip them) or unset (when CUDA is "
                 f"available); got {flag!r}")
    if flag == "0":
        return False
    if flag == "1":
        if not available:
            sys.exit(
                "KFUSE_CUDA=1 but no CUDA build is possible: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
            )
        return True
    return available


def _cuda_wheel_includes() -> list[str]:
    # torch's CUDA headers (ATen/cuda/CUDAContext.h, included by bindings.cpp) need cusparse.h
    # and cublas_v2.h. A bare nvcc toolkit may lack them (this machine's CUDA 13.0 does), while
    # torch's pip dependencies ship them under site-packages/nvidia/<cuXX>/include.
    if cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")):
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted({os.path.dirname(h) for r in roots for h in glob.glob(os.path.join(r, "*", "include", "cusparse.h"))})


def _extension():
    with_cuda = _want_cuda()
    sources = [s for s in _source_list() if with_cuda or not s.endswith(".cu")]
    # The hash goes into a generated header that only bindings.cpp includes, not into a -D flag:
    # a flag that changes with every csrc edit made ninja recompile every source (~8 min for
    # deu_cpu.cpp's ISA clones on 2 cores); with the header, only the edited file and bindings.cpp.
    gen = ROOT / "build" / "generated"
    header = gen / "kfuse_sources_hash.h"
    text = f'#define KFUSE_SOURCES_HASH "{_load_sources_module().sources_hash(ROOT / "csrc")}"\n'
    if not header.exists() or header.read_text() != text:
        gen.mkdir(parents=True, exist_ok=True)
        header.write_text(text)
    defines = []
    includes = [str(gen)]
    # No -std flag: torch adds the standard its headers need (C++17 for 2.11, C++20 for 2.14).
    # -Wno-psabi: GCC notes an ABI change for 64-byte vector arguments (deu_cpu_simd.h); they never
    # cross a non-inlined call, and the note ignores `#pragma GCC diagnostic`.
    cxx = ["-O3", "-fopenmp", "-Wno-psabi"]
    print(f"kfuse: building kfuse._C with {'CPU + CUDA' if with_cuda else 'CPU only'} kernels")
    if with_cuda:
        defines.append(("KFUSE_WITH_CUDA", None))
        nvcc = [
            "-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
            "--threads=2",  # the two architectures in parallel (deu_cuda.cu: ~17 s each)
        ]
        return cpp_extension.CUDAExtension(
            "kfuse._C", sources, define_macros=defines, include_dirs=includes + _cuda_wheel_includes(),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "kfuse._C", sources, define_macros=defines, include_dirs=includes,
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
    )


setup(
    package_dir={"kfuse": "python/kfuse", "kfuse.triton_kernels": "triton_kernels"},
    packages=[
        "kfuse", "kfuse.reference", "kfuse.ops", "kfuse.nn", "kfuse.bench", "kfuse.triton_kernels",
        "kfuse.integrations", "kfuse.models", "kfuse.demos", "kfuse.data",
    ],
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
