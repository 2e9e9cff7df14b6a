"""Shared launch plumbing (kfuse._backends) that no single op's tests reach on a CPU machine."""

from __future__ import annotations

import contextlib

import torch

from kfuse import _backends
from kfuse.triton_kernels import deu, embedding, kv, lora


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (no GPU needed to test the device guard)."""

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 1)


def test_triton_launchers_run_on_their_inputs_device(monkeypatch) -> None:
    """Triton launches on the current CUDA device, so a launcher given tensors on cuda:1 while cuda:0 is
    current must switch to cuda:1 (its first tensor, or its first list's first tensor), and must not
    switch when that device is already current."""
    entered: list[torch.device] = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    launch = _backends.on_input_device(lambda *args, **kwargs: seen.append((args, kwargs)) or "done")
    t = torch.zeros(2).as_subclass(_OnCuda1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert launch(t, 3, flag=True) == "done" and entered == [torch.device("cuda", 1)]
    assert launch([t, t], 3) == "done" and len(entered) == 2  # a list of tables: its first tensor
    assert launch(torch.zeros(2), 3) == "done" and len(entered) == 2  # CPU tensors: nothing to switch
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert launch(t) == "done" and len(entered) == 2  # already current
    assert len(seen) == 4
    # Every public Triton launcher is guarded.
    launchers = [lora.lora_forward, lora.lora_backward, lora.lora_multi_forward, lora.lora_shrink,
                 lora.lora_dropout_mask, kv.paged_decode, kv.paged_prefill, embedding.forward,
                 embedding.backward_sparse, embedding.backward_fused, embedding.backward_psw,
                 embedding.stochastic_round, deu.deu_forward, deu.deu_backward]
    assert all(f.__code__ is launch.__code__ for f in launchers)
