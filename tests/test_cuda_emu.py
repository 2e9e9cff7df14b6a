"""The CUDA emulator (tests/cuda_emu) itself: collectives give the right values, and the bugs it
promises to report are reported, so a passing emulated kernel test means something."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path

import cuda_emu
import pytest
import torch


@pytest.fixture(scope="module")
def emu() -> ctypes.CDLL:
    lib = cuda_emu.build("selftest", [cuda_emu.EMU / "selftest.cu"], [], [])
    for name in ("emu_block_sum", "emu_vote_after_exit", "emu_split_warp", "emu_shuffle_after_exit",
                 "emu_copy_offset"):
        getattr(lib, name).restype = ctypes.c_char_p
    return lib


def test_rewrite() -> None:
    src = """
    k<T, 4><<<dim3(a, b), threads, smem * sizeof(float), stream>>>(x,
        static_cast<int>(n), f(y, z));
    extern __shared__ unsigned char raw[];
    g<<<1, 32>>>();"""
    out = cuda_emu.rewrite(src)
    assert "::kfemu::launch(::kfemu::Config(dim3(a, b), threads, smem * sizeof(float), stream), k<T, 4>, x,\n" \
           "        static_cast<int>(n), f(y, z));" in out
    assert "unsigned char* raw = ::kfemu::dynamic_shared<unsigned char>();" in out
    assert "::kfemu::launch(::kfemu::Config(1, 32), g);" in out
    assert out.count("\n") == src.count("\n"), "line numbers must survive the rewrite"


@pytest.mark.parametrize("n,threads", [(1, 32), (1000, 96), (4099, 256), (70000, 1024)])
def test_block_sums(emu: ctypes.CDLL, n: int, threads: int, seed: int) -> None:
    """Shuffles down and across, shared memory after __syncthreads, early-returning warps."""
    x = torch.randn(n)
    blocks = -(-n // threads)
    out = torch.full((blocks,), float("nan"))
    cuda_emu.check(emu.emu_block_sum(cuda_emu.ptr(x), cuda_emu.ptr(out), n, threads))
    expected = torch.nn.functional.pad(x.double(), (0, blocks * threads - n)).view(blocks, threads).sum(1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [1, 7, 32])
def test_vote_after_exit(emu: ctypes.CDLL, n: int) -> None:
    """__activemask after some lanes exited names exactly the lanes still running."""
    out = torch.zeros(32, dtype=torch.int32)
    cuda_emu.check(emu.emu_vote_after_exit(cuda_emu.ptr(out), n))
    assert [v & 0xFFFFFFFF for v in out[:n].tolist()] == [(1 << n) - 1] * n


def test_reports_bugs(emu: ctypes.CDLL) -> None:
    out = torch.zeros(32)
    with pytest.raises(RuntimeError, match="deadlock"):
        cuda_emu.check(emu.emu_split_warp(cuda_emu.ptr(out)))
    with pytest.raises(RuntimeError, match="names lane 8, which has exited"):
        cuda_emu.check(emu.emu_shuffle_after_exit(cuda_emu.ptr(out)))
    with pytest.raises(RuntimeError, match="invalid configuration"):
        cuda_emu.check(emu.emu_block_sum(cuda_emu.ptr(out), cuda_emu.ptr(out), 32, 2048))
    # and it recovers: the next launch runs normally
    x = torch.ones(64)
    cuda_emu.check(emu.emu_block_sum(cuda_emu.ptr(x), cuda_emu.ptr(out), 64, 64))
    assert out[0].item() == 64


@pytest.mark.parametrize("shift", [0, 1])
def test_guarded_buffers(emu: ctypes.CDLL, shift: int) -> None:
    x, y = cuda_emu.Guarded(37, torch.float32, shift), cuda_emu.Guarded(37, torch.float32, shift)
    x.view.copy_(torch.arange(37.0))
    assert x.view.data_ptr() % 16 == 4 * shift
    cuda_emu.check(emu.emu_copy_offset(cuda_emu.ptr(x.view), cuda_emu.ptr(y.view), 36, 1, 0))
    assert y.view[:36].tolist() == list(range(1, 37)) and y.view[36].isnan(), "unwritten elements stay NaN"
    x.check("x")
    y.check("y")
    cuda_emu.check(emu.emu_copy_offset(cuda_emu.ptr(x.view), cuda_emu.ptr(y.view), 37, 0, -1))
    with pytest.raises(AssertionError, match="y: a kernel wrote outside its buffer"):
        y.check("y")


def test_guarded_buffers_fault_on_reads_past_the_end() -> None:
    """A read 16 bytes or more past a buffer kills the process (here a child) with SIGSEGV."""
    script = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
import ctypes, torch, cuda_emu
lib = cuda_emu.build("selftest", [cuda_emu.EMU / "selftest.cu"], [], [])
x, y = cuda_emu.Guarded(37, torch.float32), cuda_emu.Guarded(37, torch.float32)
lib.emu_copy_offset(cuda_emu.ptr(x.view), cuda_emu.ptr(y.view), 37, int(sys.argv[1]), 0)
"""
    ok = subprocess.run([sys.executable, "-c", script, "3"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr  # within the last 16 bytes: not caught, by design
    bad = subprocess.run([sys.executable, "-c", script, "4"], capture_output=True, text=True)
    assert bad.returncode == -signal.SIGSEGV, (bad.returncode, bad.stderr[-2000:])
