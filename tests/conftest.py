"""Shared test set-up: device markers and the Triton interpreter switch."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter on CPU tensors. This must be set
# before any Triton kernel is defined (triton.jit reads it at decoration time).
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch")
    on_gpu = pytest.mark.skip(
        reason="Triton-interpreter tests run on CPU-only machines; with a GPU the same kernels "
        "are tested compiled (the '-cuda' variants)"
    )
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(no_gpu)
        if "interpret" in item.keywords and HAS_CUDA:
            item.add_marker(on_gpu)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh, reproducible seed per test (derived from its id), applied to torch's RNG."""
    s = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(s)
    return s


@pytest.fixture
def backward_calls(monkeypatch: pytest.MonkeyPatch):
    """``calls = backward_calls(ops)`` counts, in ``calls["kernels"]`` and ``calls["reference"]``,
    the calls of an op module's kernel backward (``_backward_impl``) and reference backward
    (``_reference_vjp``) for the rest of the test."""
    def install(ops) -> dict[str, int]:
        calls = {"kernels": 0, "reference": 0}
        def counter(key: str, fn):
            def counted(*args, **kwargs):
                calls[key] += 1
                return fn(*args, **kwargs)
            return counted

        for key, attr in (("kernels", "_backward_impl"), ("reference", "_reference_vjp")):
            monkeypatch.setattr(ops, attr, counter(key, getattr(ops, attr)))
        return calls
    return install
