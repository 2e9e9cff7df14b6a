"""Checks of code that a CUDA graph captures, without a GPU: run it on fake CUDA tensors
(``FakeTensorMode``) under :class:`MixedDevices`, which logs every aten op that takes a CPU tensor beside
a CUDA one. Such an op is a host-to-device copy: a capture refuses it, and outside one it syncs."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kfuse.kv import PagedKVCache


class MixedDevices(TorchDispatchMode):
    """Logs aten ops (``ops``) and those taking both CPU and CUDA tensors (``mixed``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devs = {a.device.type for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        self.ops.append(str(func))
        if {"cpu", "cuda"} <= devs:
            self.mixed.append(str(func))
        return func(*args, **kwargs)


def fake_cuda_device_state(cache: PagedKVCache) -> None:
    """Give a mirrored CPU cache (``_mirror=True``) fake ``cuda:0`` device tensors (call inside a
    ``FakeTensorMode(allow_non_fake_inputs=True)``); its host state stays real."""
    sizes = [t.numel() for t in (cache.block_table, cache.seq_lens, cache.page_refcount, cache.free_stack,
                                 cache.free_top)]
    dev = torch.device("cuda", 0)
    flat = torch.zeros(sum(sizes), dtype=torch.int32, device=dev)
    table, cache.seq_lens, cache.page_refcount, cache.free_stack, cache.free_top = flat.split(sizes)
    cache.block_table = table.view(cache.max_seqs, cache.max_pages_per_seq)
    cache._flat, cache.device = flat, dev
    cache._scratch = torch.zeros(cache.num_pages, dtype=torch.int64, device=dev)
    cache.k_pages = torch.zeros(cache.k_pages.shape, dtype=cache.dtype, device=dev)
    cache.v_pages = torch.zeros(cache.v_pages.shape, dtype=cache.dtype, device=dev)
