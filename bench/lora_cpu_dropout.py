"""The cpu backend's dropout in a LoRA training step, three ways: the product with the mask made inside it
(``_C.lora_dropout_mul``, now), the product with a Philox mask tensor (``_C.lora_dropout_keep``, 2026-12-06), and
with a torch.rand mask tensor (``ops.lora._generator_mask``, before; each swapped in for the A/B), against PEFT's
own layers, on the LoRA demo's GPT-2 (width 128, 4 layers, r = 4 on every Conv1D, dropout 0.1, batch 32 x 74 tokens),
forward + backward + AdamW, fp32, 2 threads; 4 interleaved rounds of 10 timed steps each, medians.
Usage: ``python bench/lora_cpu_dropout.py``.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch

from kfuse.demos import lora_finetune as d
from kfuse.ops import lora as ops


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    from transformers import GPT2LMHeadModel  # noqa: PLC0415 (a bench dependency)

    tok, size = d.WordTokenizer(d.corpus()), d.Size()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(d._config(tok, size))
    batch = d._batch(tok, d._examples(tok, d.restaurants(32, test=False, seed=0), d.describe), "cpu")
    models = {}
    for name in ("peft", "kfuse"):
        m = d.adapt(base, 4, dropout=0.1, fused=name == "kfuse", seed=0).train()
        models[name] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3))
    fused = ops._dropout_mul

    def product_with(mask):  # the products as they were made before _C.lora_dropout_mul: a mask tensor, then t * it
        def mul(seed, p, ts, inplace):
            keep = mask(seed, ts[0].shape[0], ts[0].shape[1], p)
            return [t.mul_(keep) if ip else t * keep for t, ip in zip(ts, inplace, strict=True)]
        return mul

    variants = {"kfuse (fused product)": fused, "kfuse (Philox mask)": product_with(ops._cpu_mask),
                "kfuse (torch.rand mask)": product_with(ops._generator_mask)}

    def step(name: str) -> None:
        m, opt = models[name]
        loss = m(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    res: dict[str, list[float]] = {"peft": [], **{label: [] for label in variants}}
    try:
        for _ in range(4):
            for label, times in res.items():
                ops._dropout_mul = variants.get(label, fused)
                name = "peft" if label == "peft" else "kfuse"
                for _ in range(3):
                    step(name)
                for _ in range(10):
                    t0 = time.perf_counter()
                    step(name)
                    times.append(time.perf_counter() - t0)
    finally:
        ops._dropout_mul = fused
    for label, times in res.items():
        print(f"{label:<26} median {1e3 * statistics.median(times):6.1f} ms a step (40 steps, 4 interleaved rounds)")


if __name__ == "__main__":
    main()
