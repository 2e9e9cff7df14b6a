"""The CUDA emulator (tests/cuda_emu) itself: every intrinsic gives what CUDA documents, the
schedule exposes races, and the bugs it promises to report are reported, so that a passing
emulated kernel test means something."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import cuda_emu
import pytest
import torch

SEEDS = [0, 7, 12345]  # schedules: rising order, then shuffled ones
POISON = -1  # what an undefined read gives: all-ones bits


@pytest.fixture(scope="module")
def emu() -> ctypes.CDLL:
    lib = cuda_emu.build("selftest", [cuda_emu.EMU / "selftest.cu"], [], [])
    for name in ("emu_block_sum", "emu_warp_ops", "emu_narrow_then_wide", "emu_active_mask", "emu_neighbours",
                 "emu_fresh_shared", "emu_copy_offset", "emu_bug"):
        getattr(lib, name).restype = ctypes.c_char_p
    lib.kfemu_set_schedule.argtypes = [ctypes.c_uint64]
    yield lib
    lib.kfemu_set_schedule(0)


def run(emu: ctypes.CDLL, fn: str, *args: object, seed: int = 0) -> None:
    emu.kfemu_set_schedule(seed)
    cuda_emu.check(getattr(emu, fn)(*(cuda_emu.ptr(a) if isinstance(a, torch.Tensor) else a for a in args)))


def test_rewrite() -> None:
    src = """
    k<T, 4><<<dim3(a, b), threads, smem * sizeof(float), stream>>>(x,
        static_cast<int>(n), f(y, z));
    extern __shared__ unsigned char raw[];
    __shared__ A red[kLanes][19];
    __shared__ __align__(16) float one;
    g<<<1, 32>>>();"""
    out = cuda_emu.rewrite(src)
    assert "::kfemu::launch(::kfemu::Config(dim3(a, b), threads, smem * sizeof(float), stream), k<T, 4>, x,\n" \
           "        static_cast<int>(n), f(y, z));" in out
    assert "unsigned char* raw = ::kfemu::dynamic_shared<unsigned char>();" in out
    assert "auto& red = ::kfemu::static_shared<A[kLanes][19], __COUNTER__>();" in out
    assert "auto& one = ::kfemu::static_shared<float, __COUNTER__>();" in out
    assert "::kfemu::launch(::kfemu::Config(1, 32), g);" in out
    assert out.count("\n") == src.count("\n"), "line numbers must survive the rewrite"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,threads", [(1, 32), (1000, 96), (4099, 256), (70000, 1024)])
def test_block_sums(emu: ctypes.CDLL, n: int, threads: int, seed: int) -> None:
    """Shuffles down and across, shared memory after __syncthreads, early-returning warps."""
    x = torch.randn(n)
    blocks = -(-n // threads)
    out = torch.full((blocks,), float("nan"))
    run(emu, "emu_block_sum", x, out, n, threads, seed=seed)
    expected = torch.nn.functional.pad(x.double(), (0, blocks * threads - n)).view(blocks, threads).sum(1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


def int32(u: int) -> int:
    return (u + 2**31) % 2**32 - 2**31


def warp_ops_expected(v: list[int], alive: int) -> list[list[int]]:
    """selftest.cu's warp_ops as the CUDA Programming Guide defines each intrinsic. Lanes at
    or past ``alive`` have exited: they are left out of reductions and read as undefined."""
    def shfl(lane: int, kind: str, arg: int, width: int = 32) -> int:
        base, arg = lane & ~(width - 1), arg % 32  # PTX: the operand's low 5 bits
        if kind == "idx":
            src = base + arg % width  # the source lane modulo width, in the caller's group
        elif kind == "up":
            src = lane - arg if lane - arg >= base else lane  # below the group: own value
        elif kind == "down":
            src = lane + arg if lane + arg < base + width else lane  # past the group: own value
        else:
            src = lane ^ arg if lane ^ arg < base + width else lane  # later groups: own value
        return v[src] if src < alive else POISON

    live = [x % 2**32 for x in v[:alive]]
    ballot = sum(1 << k for k in range(alive) if v[k] & 1)
    total, any_bits, all_bits = sum(live), 0, 2**32 - 1
    for x in live:
        any_bits, all_bits = any_bits | x, all_bits & x
    return [
        [shfl(lane, "idx", (lane * 7 + 3) & 31), shfl(lane, "up", 3), shfl(lane, "down", 5), shfl(lane, "xor", 6),
         shfl(lane, "xor", 16, 16), shfl(lane, "down", 2, 8), shfl(lane, "up", 1, 4), shfl(lane, "idx", 9, 8),
         int32(ballot), int32(total), int32(any_bits), int32(all_bits), shfl(lane, "down", 33),
         shfl(lane, "xor", -1)]
        for lane in range(alive)
    ]  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alive", [32, 13, 8, 1])
def test_warp_intrinsics(emu: ctypes.CDLL, alive: int, seed: int) -> None:
    """Shuffles of every kind and width, ballot and reductions, with and without exited lanes."""
    gen = torch.Generator().manual_seed(alive * 100 + seed)
    v = torch.randint(-(2**30), 2**30, (32,), dtype=torch.int32, generator=gen)
    out = torch.zeros(32, 14, dtype=torch.int32)
    run(emu, "emu_warp_ops", v, out, alive, seed=seed)
    assert out[:alive].tolist() == warp_ops_expected(v.tolist(), alive)


@pytest.mark.parametrize("seed", SEEDS)
def test_narrower_mask_then_whole_warp(emu: ctypes.CDLL, seed: int) -> None:
    out = torch.zeros(32, dtype=torch.int32)
    run(emu, "emu_narrow_then_wide", out, seed=seed)
    assert out.tolist() == [lane if lane < 16 else lane ^ 8 for lane in range(32)]


@pytest.mark.parametrize("n", [32, 13, 1])
def test_activemask(emu: ctypes.CDLL, n: int) -> None:
    """The lanes that reach __activemask together: all of them in rising order; under shuffled
    schedules a partition of them (as divergence may give), each lane in its own part."""
    out = torch.zeros(32, dtype=torch.int32)
    run(emu, "emu_active_mask", out, n, seed=0)
    assert [m % 2**32 for m in out[:n].tolist()] == [(1 << n) - 1] * n
    split = False
    for seed in range(1, 20):
        run(emu, "emu_active_mask", out, n, seed=seed)
        masks = [m % 2**32 for m in out[:n].tolist()]
        for lane, m in enumerate(masks):
            assert m >> lane & 1 and m < 1 << n, f"lane {lane}: mask {m:#x}"
            assert all(masks[k] == m for k in range(n) if m >> k & 1), "the parts must partition the lanes"
        split |= any(m != (1 << n) - 1 for m in masks)
    assert split or n == 1, "shuffled schedules must sometimes split the active lanes"


@pytest.mark.parametrize("threads,sync", [(32, 1), (96, 2), (256, 2)])
def test_barriers_order_shared_memory(emu: ctypes.CDLL, threads: int, sync: int) -> None:
    t = torch.arange(threads)
    expected = torch.stack([3 * ((t + 1) % threads), 3 * ((t - 1) % threads)], 1).flatten().int()
    out = torch.zeros(2 * threads, dtype=torch.int32)
    for seed in SEEDS:
        run(emu, "emu_neighbours", out, threads, sync, seed=seed)
        assert torch.equal(out, expected), f"seed {seed}"
    # Without the barrier every schedule shows the race: some thread reads a slot not yet written.
    for seed in SEEDS:
        run(emu, "emu_neighbours", out, threads, 0, seed=seed)
        assert (out == POISON).any(), f"seed {seed}: a missing barrier went unnoticed"
        # Reading the slot below (thread t - 1's) goes unnoticed in rising order, not when shuffled.
        assert (out[3::2] == POISON).any() == (seed != 0), f"seed {seed}"


@pytest.mark.parametrize("seed", SEEDS)
def test_shared_memory_starts_undefined_every_block(emu: ctypes.CDLL, seed: int) -> None:
    out = torch.zeros(5 * 5, dtype=torch.int32)
    run(emu, "emu_fresh_shared", out, 5, seed=seed)
    assert (out == POISON).all(), "static and dynamic shared memory must not carry over between blocks"


@pytest.mark.parametrize("which,message", [
    (0, "deadlock in block"), (1, "mask omits the calling lane"),
    (2, "deadlock in block .* wait at different warp collectives"), (3, "shuffle width 12 is not a power of 2"),
    (5, "threads wait at different __syncthreads"), (6, "a kernel threw: boom"),
])  # fmt: skip
def test_reports_bugs(emu: ctypes.CDLL, which: int, message: str) -> None:
    out = torch.zeros(64)
    with pytest.raises(RuntimeError, match=message):
        run(emu, "emu_bug", out, which, 32)
    with pytest.raises(RuntimeError, match="kernel launch failed: invalid configuration"):
        run(emu, "emu_block_sum", out, out, 32, 2048)
    x = torch.ones(64)  # and the emulator recovers: the next launch runs normally
    run(emu, "emu_block_sum", x, out, 64, 64)
    assert out[0].item() == 64


@pytest.mark.parametrize("at_start", [False, True])
@pytest.mark.parametrize("shift", [0, 1])
def test_guarded_buffers(emu: ctypes.CDLL, shift: int, at_start: bool) -> None:
    x = cuda_emu.Guarded(37, torch.float32, shift, at_start)
    y = cuda_emu.Guarded(37, torch.float32, shift, at_start)
    x.view.copy_(torch.arange(37.0))
    assert x.view.data_ptr() % 16 == 4 * shift
    run(emu, "emu_copy_offset", x.view, y.view, 36, 1, 0)
    assert y.view[:36].tolist() == list(range(1, 37)) and y.view[36].isnan(), "unwritten elements stay NaN"
    x.check("x")
    y.check("y")
    run(emu, "emu_copy_offset", x.view, y.view, 37, 1, 0)  # reads x[37], a band byte: NaN
    assert y.view[36].isnan()
    run(emu, "emu_copy_offset", x.view, y.view, 37, 0, 1 if at_start else -1)  # one past the unguarded side
    with pytest.raises(AssertionError, match="y: a kernel wrote outside its buffer"):
        y.check("y")
    with pytest.raises(ValueError, match="shift"):
        cuda_emu.Guarded(3, torch.float64, 2)


CHILD = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
import ctypes, torch, cuda_emu
lib = cuda_emu.build("selftest", [cuda_emu.EMU / "selftest.cu"], [], [])
kind, arg = sys.argv[1], int(sys.argv[2])
if kind == "spin":
    lib.emu_bug(cuda_emu.ptr(torch.zeros(32)), 4, 32)
else:
    at_start = kind == "start"
    x, y = cuda_emu.Guarded(37, torch.float32, 0, at_start), cuda_emu.Guarded(37, torch.float32, 0, at_start)
    lib.emu_copy_offset(cuda_emu.ptr(x.view), cuda_emu.ptr(y.view), 37, arg, 0)
"""


def child(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)


def test_guarded_buffers_fault_on_reads_out_of_bounds() -> None:
    """A read 16 bytes or more past a buffer's guarded side kills the process (a child here)."""
    assert child("end", "0").returncode == 0
    for side, offset in (("end", 4), ("start", -4)):
        done = child(side, str(offset))
        assert done.returncode == -signal.SIGSEGV, (side, done.returncode, done.stderr[-2000:])


def test_watchdog_stops_a_spinning_kernel() -> None:
    done = child("spin", "0", env={**os.environ, "KFEMU_TIMEOUT_S": "1"})
    assert done.returncode == -signal.SIGABRT, done.stderr[-2000:]
    assert "ran for more than 1 s (KFEMU_TIMEOUT_S)" in done.stderr
