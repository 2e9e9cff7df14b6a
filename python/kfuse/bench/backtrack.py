"""Backtracking generation in the benchmark report and in pytest-benchmark (:class:`kfuse.report.OpBench`).

CPU rows run on one torch thread (``_one_thread``: the model is tiny). Cases:

- ``decode``: greedy generation of ``new`` tokens for a batch of ragged prompts by
  :class:`kfuse.models.LlamaForCausalLM` on the paged cache (``kfuse``: one ``forward_packed`` call per
  step, argmax on the device; on CUDA also ``kfuse-graphs``: the steps replayed from a CUDA graph,
  ``model.decode_graphs``, captured in the warm-up run) against ``transformers``' own ``generate``
  (``transformers``: the same weights, left-padded prompts, ``DynamicCache``, greedy), timed whole
  (prefill included); ``tok/s`` beside the time. Basis: ``transformers``. Targets (the issue): ≥ 1.5×
  its tokens/s on the GPU (bf16, a random-initialised Llama of 1B-class shapes: hidden 2048, 16 layers,
  32/8 heads, MLP 8192, vocabulary 128256), ≥ 1.0× on the CPU (float32, the backtracking demo's model:
  hidden 128, 2 layers, vocabulary 2048). Checked: each sequence's first generated token against the
  argmax of the same model in float64 (the fraction that differ; later tokens may part on near-ties).
- ``backtrack``: :func:`kfuse.backtrack.generate` on the demo's model shape (random weights) with a
  check that flags a window holding any of a fixed set of token ids (about ``rate`` of the
  vocabulary), the four generators of ``kfuse.demos.backtrack``: ``kfuse`` (per-sequence rollback),
  ``plain``, ``reset`` and ``dynamic-cache`` (backtracking on ``DynamicCache``, batch-wide crop), wall
  time per call, with ``comp/kept`` (tokens computed per token kept) and ``flagged`` (flagged windows
  left in the outputs) beside it. Basis: ``plain``. The target is on ``comp/kept`` (≤ 1.1× plain where
  violations are rare, below ``reset``'s): see the demo; no time target. Checked: no flagged window
  left (``kfuse``, ``reset``, ``dynamic-cache``); ``plain``'s tokens equal those of the same sampling
  run on ``transformers``' model (``DynamicCacheModel``; the fraction that differ).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kfuse.report import Candidate, Case, Ceilings

NAME = "backtrack"
#: A generation check over token windows: sequences check every CHECK_EVERY tokens.
CHECK_EVERY = 8
_DEMO = dict(hidden=128, layers=2, heads=4, kv_heads=2, mlp=352, vocab=2048)
_ONE_B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, mlp=8192, vocab=128256)


def case(device: torch.device, dtype: torch.dtype, mode: str, batch: int, new: int, *, prompt: tuple[int, int],
         rate: float = 0.0, **shape: int) -> Case:
    """A case: ``batch`` prompts of ``prompt[0]``–``prompt[1]`` tokens, ``new`` tokens each, on a Llama of
    ``shape`` (hidden, layers, heads, kv_heads, mlp, vocab); ``rate``: the backtrack check's id share."""
    params: dict[str, Any] = {"prompt": f"{prompt[0]}-{prompt[1]}", **shape}
    if mode == "backtrack":
        params["rate"] = rate
    return Case(NAME, (batch, new), dtype, mode, device, params)


def cases(device: torch.device, quick: bool) -> list[Case]:
    """CUDA: decode, bf16, batch 32, prompts of 32–512 tokens, 128 new, the 1B-class shape (``quick``: 4
    layers). CPU: decode, fp32, batch 32, prompts of 8–64 tokens, 64 new, the demo's shape; backtrack at
    rates 0.002 and 0.02 (``quick``: 0.02), batch 32, 64 new. None without ``transformers`` (the model is
    built from its ``LlamaConfig``; it is a test/bench dependency, not kfuse's)."""
    if importlib.util.find_spec("transformers") is None:
        print("kfuse.bench.backtrack: transformers is not installed; no backtrack cases", file=sys.stderr)
        return []
    if device.type == "cuda":
        shape = dict(_ONE_B, layers=4) if quick else _ONE_B
        return [case(device, torch.bfloat16, "decode", 32, 128, prompt=(32, 512), **shape)]
    out = [case(device, torch.float32, "decode", 32, 64, prompt=(8, 64), **_DEMO)]
    return out + [case(device, torch.float32, "backtrack", 32, 64, prompt=(4, 16), rate=r, **_DEMO)
                  for r in ((0.02,) if quick else (0.002, 0.02))]


def bytes_moved(case: Case) -> int | None:
    """None: a whole generation has no byte floor worth a ratio."""
    return None


def flops(case: Case) -> int | None:
    """None: judged by tokens/s."""
    return None


def target(case: Case) -> float | None:
    """Decode: time ≤ 1 / 1.5 of ``transformers``' on CUDA, ≤ 1.0 on the CPU; backtrack: none on time."""
    if case.mode == "decode":
        return 1 / 1.5 if case.device.type == "cuda" else 1.0
    return None


def ratio_basis(case: Case, times: dict[str, float], ceilings: Ceilings) -> tuple[float, str] | None:
    """Decode: ``transformers``' generate; backtrack: ``plain``."""
    name = "transformers" if case.mode == "decode" else "plain"
    return (times[name], name) if name in times else None


@dataclass
class Inputs:
    """A case's ``transformers`` model, kfuse's model over it, and the prompts (CPU int64 tensors)."""

    hf: Any
    model: Any
    prompts: list[Tensor]
    banned: list[int] = field(default_factory=list)  # backtrack: the ids the check flags
    graphed: Any = None  # decode, kfuse-graphs: its DecodeGraphs (and cache), made by the first run


def _hf_model(case: Case) -> Any:
    from transformers import LlamaConfig  # noqa: PLC0415
    from transformers import LlamaForCausalLM as HFLlama  # noqa: PLC0415

    p = case.params
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["mlp"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                      num_key_value_heads=p["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=True)
    with torch.device(case.device):  # initialised where it runs: 1.2B parameters take ~30 s on one CPU core
        model = HFLlama(cfg)
    return model.to(case.dtype).eval()


def make_inputs(case: Case, seed: int) -> Inputs:
    """A random-initialised model for the case (seeded), ragged prompts of ids in ``[1, vocab)`` and, for
    backtrack, ``max(1, rate · vocab)`` ids the check flags."""
    from kfuse.models import LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    hf = _hf_model(case)
    g = torch.Generator().manual_seed(seed + 1)
    lo, hi = map(int, case.params["prompt"].split("-"))
    vocab = case.params["vocab"]
    prompts = [torch.randint(1, vocab, (int(n),), generator=g)
               for n in torch.randint(lo, hi + 1, (case.shape[0],), generator=g)]
    banned = (torch.randperm(vocab - 1, generator=g)[:max(1, round(case.params["rate"] * vocab))] + 1).tolist() \
        if case.mode == "backtrack" else []
    return Inputs(hf, LlamaForCausalLM.from_hf(hf), prompts, banned)


# --------------------------------------------------------------------------- decode


def _kfuse_decode(case: Case, inp: Inputs, graphs: bool = False) -> Tensor:
    """Greedy: the prompts in one packed call, then one token per sequence per call; ``[B, new]`` ids.
    ``graphs``: the steps replay CUDA graphs (``model.decode_graphs``) on one cache kept in ``inp`` across
    runs, so the graph is captured once, in the first (warm-up) run; the sequences are freed after each."""
    batch, new = case.shape
    longest = max(p.numel() for p in inp.prompts) + new

    def new_cache() -> Any:
        return inp.model.new_cache(16, num_pages=batch * -(-longest // 16), max_seqs=batch)

    if graphs and inp.graphed is None:
        inp.graphed = inp.model.decode_graphs(new_cache(), max_len=longest)
    step = inp.graphed if graphs else None
    cache = step.cache if step else new_cache()
    ids = [cache.add_sequence() for _ in range(batch)]
    try:
        lens = [p.numel() for p in inp.prompts]
        logits = inp.model.forward_packed(torch.cat(inp.prompts), lens, ids, cache)
        last = logits[torch.tensor(lens).cumsum(0).to(logits.device) - 1]
        out = []
        for i in range(new):
            tok = last.argmax(-1)
            out.append(tok)
            if i + 1 < new:
                last = step(tok, ids) if step else inp.model.forward_packed(tok, [1] * batch, ids, cache)
    finally:
        if step:
            for s in ids:
                cache.free(s)
    return torch.stack(out, 1)


def _padded(inp: Inputs, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded ``[B, T]`` ids (pad id 0) and attention mask, as ``generate`` takes a ragged batch."""
    width = max(p.numel() for p in inp.prompts)
    ids = torch.zeros(len(inp.prompts), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(inp.prompts):
        ids[j, width - p.numel():], mask[j, width - p.numel():] = p, 1
    return ids.to(device), mask.to(device)


def _hf_decode(case: Case, inp: Inputs) -> Tensor:
    ids, mask = _padded(inp, case.device)
    new = case.shape[1]
    with torch.no_grad():
        out = inp.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _tok_per_s(case: Case) -> Any:
    return lambda ms: {"tok/s": case.shape[0] * case.shape[1] / (ms / 1e3)}


# --------------------------------------------------------------------------- backtrack


class _Generation:
    """A generator run (``generate`` with ``mode`` on kfuse's model, or on ``DynamicCacheModel``) whose
    last result feeds ``extra`` (comp/kept, flagged) and the check."""

    def __init__(self, case: Case, inp: Inputs, method: str) -> None:
        self.case, self.inp, self.method = case, inp, method
        self.flagged = 0
        self.computed_per_kept = 0.0

    def _check(self) -> Any:
        from kfuse.backtrack import WordListCheck  # noqa: PLC0415

        return WordListCheck([[t] for t in self.inp.banned])

    def __call__(self) -> list[list[int]]:
        from kfuse.demos.backtrack import flagged_windows, run_method  # noqa: PLC0415

        check = self._check()
        res, computed = run_method(self.method, self.inp.model, self.inp.hf, self.inp.prompts,
                                   max_new_tokens=self.case.shape[1], check=check, check_every=CHECK_EVERY,
                                   temperature=1.0, top_k=50, seed=0, max_backtracks=4, max_resets=2)
        self.computed_per_kept = computed / max(res.totals["tokens_kept"], 1)
        self.flagged = sum(flagged_windows(res.tokens, check, CHECK_EVERY))
        return res.tokens

    def extra(self, ms: float) -> dict[str, float]:
        return {"comp/kept": self.computed_per_kept, "flagged": float(self.flagged)}


def _flagged_error(gen: _Generation) -> Any:
    return lambda tokens: float(gen.flagged)


def _plain_error(case: Case, inp: Inputs) -> Any:
    """The fraction of ``plain``'s tokens that differ from the same sampling run on ``transformers``' model."""
    def check(tokens: list[list[int]]) -> float:
        from kfuse.backtrack import generate  # noqa: PLC0415
        from kfuse.demos.backtrack import DynamicCacheModel  # noqa: PLC0415

        theirs = generate(DynamicCacheModel(inp.hf), inp.prompts, mode="plain", max_new_tokens=case.shape[1],
                          temperature=1.0, top_k=50, seed=0).tokens
        total = sum(map(len, theirs))
        diff = sum(a != b for x, y in zip(tokens, theirs, strict=True) for a, b in zip(x, y, strict=True))
        return (diff + sum(abs(len(x) - len(y)) for x, y in zip(tokens, theirs, strict=True))) / total
    return check


def _one_thread(case: Case, fn: Callable[[], Any]) -> Callable[[], Any]:
    """On the CPU, ``fn`` run on one torch thread (every candidate alike): the CPU cases' model is 128
    wide, and OpenMP's barriers between two threads cost more than they save — in one report run at
    load ~2.5, transformers' generate took 12.1 s on 2 threads against 0.16 s on 1 (kfuse 2.1 s, 0.11 s)."""
    if case.device.type != "cpu":
        return fn

    def run() -> Any:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)
    return run


def candidates(case: Case, inputs: Inputs) -> list[Candidate]:
    """Decode: ``kfuse``, ``kfuse-graphs`` (CUDA), ``transformers``; backtrack: ``kfuse``, ``plain``, ``reset``,
    ``dynamic-cache``."""
    if case.mode == "decode":
        out = [Candidate("kfuse", "backend", _one_thread(case, lambda: _kfuse_decode(case, inputs)),
                         extra=_tok_per_s(case))]
        if case.device.type == "cuda":
            out.append(Candidate("kfuse-graphs", "backend", lambda: _kfuse_decode(case, inputs, graphs=True),
                                 extra=_tok_per_s(case)))
        return out + [Candidate("transformers", "baseline", _one_thread(case, lambda: _hf_decode(case, inputs)),
                                extra=_tok_per_s(case))]
    out = []
    for method in ("kfuse", "plain", "reset", "dynamic-cache"):
        gen = _Generation(case, inputs, method)
        err = _plain_error(case, inputs) if method == "plain" else _flagged_error(gen)
        out.append(Candidate(method, "backend" if method == "kfuse" else "baseline", _one_thread(case, gen),
                             error=err, extra=gen.extra))
    return out


def reference(case: Case, inputs: Inputs) -> Tensor | None:
    """Decode: each prompt's next token by the model in float64 (``[B]``); backtrack: None (own checks)."""
    if case.mode != "decode":
        return None
    hf64 = copy.deepcopy(inputs.hf).double()
    with torch.no_grad():
        return torch.stack([hf64(input_ids=p[None].to(case.device)).logits[0, -1].argmax() for p in inputs.prompts])


def error(case: Case, result: Tensor, expected: Tensor) -> float:
    """Decode: the fraction of sequences whose first generated token differs from the float64 argmax."""
    return float((result[:, 0].to(expected.device) != expected).double().mean())


def tolerance(case: Case) -> float:
    """Decode: 0 in float32, 10 % of the first tokens in bf16 (near-ties of a random model's logits);
    backtrack: no flagged window left, and 5 % of ``plain``'s tokens (sampling on a last-bit difference)."""
    if case.mode == "decode":
        return 0.0 if case.dtype == torch.float32 else 0.1
    return 0.05


def names(case: Case) -> list[str]:
    """The candidates' names for ``case``, in table order (``bench/bench_backtrack.py`` parametrizes on them)."""
    if case.mode != "decode":
        return ["kfuse", "plain", "reset", "dynamic-cache"]
    return ["kfuse", "kfuse-graphs", "transformers"] if case.device.type == "cuda" else ["kfuse", "transformers"]
