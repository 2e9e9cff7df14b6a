"""Bench modules: one per op family, used by ``python -m kfuse`` and by ``bench/bench_<op>.py``.

Each module follows :class:`kfuse.report.OpBench` (cases, inputs, candidates, float64
reference, error and tolerance, byte and FLOP formulas). Adding an op adds its module here
and one line to :data:`OPS`.
"""

from collections.abc import Callable
from typing import Any

import torch

from kfuse.bench import backtrack, deu, embedding, kv, lora
from kfuse.report import Case, OpBench

#: The ops the report knows, by the name ``--ops`` takes.
OPS: dict[str, OpBench] = {"deu": deu, "lora": lora, "kv": kv, "embedding": embedding, "backtrack": backtrack}

__all__ = ["OPS", "timed_call"]


def timed_call(op: OpBench, case: Case, name: str) -> tuple[Callable[[], Any], Any] | str:
    """For ``bench/bench_<op>.py``: ``(call, inputs)`` running candidate ``name`` of ``op`` on
    ``case`` once per call (CUDA synchronised inside the call, so pytest-benchmark times the
    device), after one untimed warm-up call (it compiles the ``torch.compile`` baselines); or the
    reason the candidate is skipped."""
    torch._dynamo.reset()
    inputs = op.make_inputs(case, seed=0)
    cand = next(c for c in op.candidates(case, inputs) if c.name == name)
    if cand.skip or cand.run is None:
        return cand.skip or "no run"
    run: Callable[[], Any] = cand.run
    if case.device.type == "cuda":
        def call() -> None:
            run()
            torch.cuda.synchronize(case.device)
    else:
        call = run
    call()
    return call, inputs
