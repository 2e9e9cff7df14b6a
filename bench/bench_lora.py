"""pytest-benchmark over the LoRA report cases: ``pytest bench/bench_lora.py --benchmark-only``.

The same cases, inputs and candidates as ``python -m kfuse --ops lora`` (from ``kfuse.bench.lora``):
the kfuse backends (skipped, with the reason, where they cannot run) and the baselines (the base
GEMM, PEFT's ``lora.Linear`` with fp32 and with low-precision adapters, base + ``addmm_``,
``torch.compile``; for the multi-adapter case PEFT's mixed batch and a gather; for the training
step the PEFT model as it is and fused by ``kfuse.integrations.peft``): forward, backward alone,
multi-adapter forward and one training step. The device is CUDA when available, else CPU; on CPU
the small (``--quick``) cases run unless ``KFUSE_BENCH_FULL=1``. Correctness is checked by the
report and the tests; here the first call only warms up (compiles the ``torch.compile``
baselines; runs the forward that a backward row then differentiates again and again) outside
the timed region.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from conftest import case_id

from kfuse.bench import lora
from kfuse.report import Case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu" and os.environ.get("KFUSE_BENCH_FULL") != "1"
CASES = lora.cases(DEVICE, QUICK)
PARAMS = [(case, name) for case in CASES for name in lora.names(case)]


@pytest.mark.parametrize(("case", "name"), PARAMS, ids=[f"{case_id(c)}-{n}" for c, n in PARAMS])
def test_lora(benchmark: Any, run_case: Any, case: Case, name: str) -> None:
    """Time one candidate on one case (synchronising CUDA inside the timed call)."""
    median, inputs = run_case("lora", lora, case, name)
    if median is not None and case.mode == "step":
        benchmark.extra_info["tok/s"] = inputs.input_ids.numel() / median
