"""The demos' training loop for ``transformers`` language models (shared by :mod:`kfuse.demos.backtrack` and
:mod:`kfuse.demos.lora_finetune`)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


def train_lm(model: nn.Module, params: Iterable[nn.Parameter], next_batch: Callable[[int], dict[str, Tensor]], *,
             steps: int, lr: float, warmup: int = 50, label: str = "train", progress: bool = True) -> list[float]:
    """Train ``model`` in place on ``steps`` batches: ``model(**next_batch(step)).loss``, AdamW (betas 0.9 and
    0.98, weight decay 0.01) over ``params``, a linear warm-up over ``warmup`` steps then a cosine decay to 0,
    gradients clipped at norm 1. ``next_batch`` is called once per step, before the forward, and timed apart
    from the step. Progress goes to stderr every 100 steps. Returns each step's seconds (forward, backward,
    clipping and the optimizer's step; the loss's ``.item()`` included)."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    seconds: list[float] = []
    t_start = time.perf_counter()
    for step in range(steps):
        batch = next_batch(step)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        seconds.append(time.perf_counter() - t0)
        if progress and (step % 100 == 0 or step == steps - 1):
            print(f"  {label} step {step + 1}/{steps}  loss {value:.3f}  {time.perf_counter() - t_start:.0f} s",
                  file=sys.stderr, flush=True)
    model.eval()
    return seconds
