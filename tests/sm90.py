"""Compile the Triton kernels for an H100/H200 (sm_90a) as their launchers launch them on a GPU,
without a GPU.

The interpreter (``TRITON_INTERPRET=1``, what the CPU tests use) never runs Triton's compiler: not
its type rules, layouts, tf32 dots or shared-memory budget. And the launchers pick other tiles
under it (smaller, so that tiny tests cross several). So each op's test file runs its launchers
in a fresh Python without ``TRITON_INTERPRET`` (the configs they pick on a GPU), on ``meta``
tensors (shapes and dtypes, no memory, so GPU-sized shapes cost nothing), inside
:func:`compile_launches`. There every launch is specialised by Triton's own binder (dtypes,
16-byte alignment, integers equal to 1 or divisible by 16: what a real launch keys its cache on)
and compiled to a cubin for sm_90a instead of running, and checked against what a launch on an
H200 would refuse: shared memory above 227 KB a block, grid dimensions past CUDA's limits.

:func:`run_script` runs such a script in ``SHARDS`` processes at once (compiling is CPU-bound;
each compiles every ``SHARDS``-th launch, all record every launch) and returns the launches.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

SM90_SHARED_BYTES = 232448  # an H100/H200 block's opt-in shared memory (227 KB)
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's grid dimensions x, y, z
SHARDS = 2
_HERE = os.path.dirname(os.path.abspath(__file__))


class _Pointer:
    """What the binder reads of a tensor argument (``dtype``, ``data_ptr()`` for alignment): a
    ``meta`` tensor has no address, so its storage offset in bytes stands in (allocations are
    aligned; a view's offset is what can break the 16-byte alignment)."""

    def __init__(self, t: Any) -> None:
        self.dtype = t.dtype
        self._offset = t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._offset


class _H200Driver:
    """The active Triton driver for compile-only launches: device 0, an sm_90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget  # noqa: PLC0415

        return GPUTarget("cuda", 90, 32)


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers a thread, stack frame bytes a thread: spills, when a kernel has no local arrays)
    of a one-kernel cubin, as ``cuobjdump -res-usage`` (shipped with Triton) reads them."""
    import re  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import triton  # noqa: PLC0415

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


@contextlib.contextmanager
def compile_launches(shard: int = 0, shards: int = 1, resources: bool = False) -> Iterator[list[dict]]:
    """Within this context every Triton launch is compiled for sm_90a and recorded, not run.

    Yields the list of launches, each a dict: ``kernel`` (name), ``grid``, ``num_warps``,
    ``dtypes`` (of its tensor arguments, in order of first appearance), ``shared`` (bytes; None
    for launches this shard did not compile) and ``constexprs``; with ``resources``, also
    ``registers`` and ``stack`` (bytes a thread, see :func:`_resources`).
    Launch ``i`` is compiled only when ``i % shards == shard``. Raises AssertionError at a launch
    that an H200 would refuse (shared memory, grid limits); a compile error propagates."""
    import torch  # noqa: PLC0415
    from triton.runtime import driver  # noqa: PLC0415
    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    launches: list[dict] = []
    real_run = JITFunction.run

    def run(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        dtypes = list(dict.fromkeys(str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)))
        args = tuple(_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args)
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
        consts = {p.name: a for p, a in zip(self.params, args, strict=False) if p.is_constexpr}
        consts.update({k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
        consts = {k: v if isinstance(v, (bool, int, float, str)) or v is None else repr(v) for k, v in consts.items()}
        rec = {"kernel": self.fn.__name__, "grid": list(grid), "num_warps": kwargs.get("num_warps", 4),
               "dtypes": dtypes, "constexprs": consts, "shared": None}
        assert len(grid) <= 3 and all(isinstance(g, int) and 0 <= g <= lim
                                      for g, lim in zip(grid, GRID_LIMITS[:len(grid)], strict=True)), \
            f"{rec['kernel']}: grid {grid} is past CUDA's limits {GRID_LIMITS}"
        if len(launches) % shards == shard:
            kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
            assert kernel.asm["cubin"], rec["kernel"]
            rec["shared"] = kernel.metadata.shared
            if resources:
                rec["registers"], rec["stack"] = _resources(kernel.asm["cubin"])
            assert rec["shared"] <= SM90_SHARED_BYTES, \
                f"{rec['kernel']} {consts}: {rec['shared']} B of shared memory, an H200 block has {SM90_SHARED_BYTES}"
        launches.append(rec)
        return None

    saved = driver._active
    driver.set_active(_H200Driver())
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = real_run
        driver._active = saved


_PRELUDE = """
import json, sys
sys.path.insert(0, {here!r})
from sm90 import compile_launches
with compile_launches({shard}, {shards}, {resources}) as _launches:
{body}
print("SM90-LAUNCHES " + json.dumps(_launches))
"""


def run_script(body: str, timeout: float = 900, resources: bool = False) -> list[dict]:
    """Run ``body`` (Python that calls Triton launchers on ``meta`` tensors) in :data:`SHARDS`
    fresh processes without ``TRITON_INTERPRET``, inside :func:`compile_launches` (``resources``
    passed on); return the launches, each with the shared memory of its compile. Raises
    AssertionError with the failing process's stderr.

    With ``KFUSE_SM90_RESOURCES=<file>`` in the environment, every test's compiles also read their
    registers and stack frames and append them to that file as markdown rows (Triton version,
    kernel, tensor dtypes, constexprs, warps, registers, stack bytes, shared bytes):
    ``KFUSE_SM90_RESOURCES=res.md pytest tests -k compile_for_sm90``."""
    resources = resources or bool(os.environ.get("KFUSE_SM90_RESOURCES"))
    indented = "\n".join("    " + line for line in body.strip("\n").splitlines())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-c", _PRELUDE.format(here=_HERE, shard=s, shards=SHARDS,
                                                                      resources=resources, body=indented)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for s in range(SHARDS)]
    shards = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-4000:]
        line = next(x for x in out.splitlines() if x.startswith("SM90-LAUNCHES "))
        shards.append(json.loads(line.split(" ", 1)[1]))
    assert len({len(s) for s in shards}) == 1, "the shards saw different launches (a launcher is not deterministic)"
    launches = [next(s[i] for s in shards if s[i]["shared"] is not None) for i in range(len(shards[0]))]
    if resources and os.environ.get("KFUSE_SM90_RESOURCES"):
        _write_table(launches, os.environ["KFUSE_SM90_RESOURCES"])
    return launches


def _write_table(launches: list[dict], path: str) -> None:
    """Append one markdown row per distinct compile (kernel, constexprs, warps, dtypes) to ``path``."""
    import triton  # noqa: PLC0415

    seen = set()
    with open(path, "a") as f:
        for x in launches:
            key = (x["kernel"], json.dumps(x["constexprs"], sort_keys=True), x["num_warps"], tuple(x["dtypes"]))
            if key in seen:
                continue
            seen.add(key)
            consts = ", ".join(f"{k}={v}".replace("triton.language.", "") for k, v in x["constexprs"].items())
            f.write(f"| {triton.__version__} | {x['kernel']} | {' '.join(x['dtypes'])} | {consts} | {x['num_warps']} | "
                    f"{x['registers']} | "
                    f"{x['stack']} | {x['shared']} |\n")


def launched_kernels(module: Any) -> set[str]:
    """The names of ``module``'s kernels its launchers launch (``name[grid](...)`` in its source)."""
    import inspect  # noqa: PLC0415
    import re  # noqa: PLC0415

    from triton.runtime.jit import KernelInterface  # noqa: PLC0415

    src = inspect.getsource(module)
    return {n for n in re.findall(r"\b(\w+)\[.*?\]\(", src)
            if isinstance(getattr(module, n, None), KernelInterface)}
