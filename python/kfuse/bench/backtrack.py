"""Backtracking generation in the benchmark report and in pytest-benchmark (:class:`kfuse.report.OpBench`).

CPU rows run on one torch thread (``_one_thread``: the model is tiny; the demo trains its model on the report's
threads, outside the rows). Cases:

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
- ``demo`` (CPU only: the demo is a CPU workload): the paper's comparison, ``python -m kfuse.demos.backtrack``,
  as rows. Per injection rate, :func:`kfuse.demos.backtrack.prepare` builds the demo's corpus (the Python
  documentation with better-profanity words injected at ``rate`` per word), trains its model (hidden 128, 2
  layers, vocabulary 2048 words; ``steps`` of 32 × 64 tokens on the report's torch threads: 20 steps on 1 and 2
  threads gave bit-identical weights, and the quick rows on 2 equal the demo's on 1) and draws its 32 clean
  prompts, all with the demo's seed 0 whatever the report's seed, so the rows' token counts are the demo's own
  for that rate and ``steps``; then the demo's
  :class:`~kfuse.demos.backtrack.Comparison` (alt-profanity-check's classifier over the last 16 tokens every 8,
  temperature 1, top-k 50, 64 tokens kept per sequence) runs ``kfuse`` (per-sequence rollback on the paged
  cache), ``plain``, ``reset`` (the paper's baseline) and ``dynamic-cache`` (backtracking on ``DynamicCache``,
  batch-wide crop). The row's time is one ``generate`` call (the classifier's calls included); beside it
  ``comp/kept`` (tokens computed per token kept), ``comp/kept vs plain`` (that over plain's), ``kept``,
  ``flagged`` (windows of the final outputs the classifier flags) and ``passes`` (forward passes). Basis:
  ``plain``; no time target. The issue's targets are on ``comp/kept``: ≤ 1.1× plain where violations are
  rare (read ``comp/kept vs plain``) and below ``reset``'s at every rate (its row). Rates 0.01 and 0.03 of the
  README's sweep at the demo's 600 steps (~1 min of training per rate on 2 cores, 2 threads); ``quick``: 0.03
  at 100 steps (loss ~5.1; ~2.7 after 600): every budget tried produces violations (30 steps, the demo test's,
  loss 6.5, 174 flagged windows; 100 steps, 121), but a barely trained model backtracks so much more that the
  four methods' timed runs cost what the training saves (about 22 s in all either way), so 100 is the cheapest
  run whose rows mean anything. Checked: no flagged window left (``kfuse``, ``reset``, ``dynamic-cache``);
  ``plain``'s tokens equal those of the same sampling run on ``transformers``' model (``DynamicCacheModel``;
  the fraction that differ). Needs the demo's dependencies (``better-profanity``, ``alt-profanity-check``);
  without them no demo rows. It replaces the former ``backtrack`` rows (the same four generators on a
  random-weight model with a token-id word list standing in for the classifier): the demo checks all they
  did, on a model that produces violations because its training text does, with the demo's real check.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kfuse.report import Candidate, Case, Ceilings

NAME = "backtrack"
#: The demo's check interval: a sequence is checked every CHECK_EVERY tokens (its window: the last 2 · CHECK_EVERY).
CHECK_EVERY = 8
#: The ``demo`` candidates, in table order.
DEMO_METHODS = ("kfuse", "plain", "reset", "dynamic-cache")
_DEMO = dict(hidden=128, layers=2, heads=4, kv_heads=2, mlp=352, vocab=2048)
_ONE_B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, mlp=8192, vocab=128256)


def case(device: torch.device, dtype: torch.dtype, mode: str, batch: int, new: int, *, prompt: tuple[int, int],
         **shape: int) -> Case:
    """A decode case: ``batch`` prompts of ``prompt[0]``–``prompt[1]`` tokens, ``new`` tokens each, on a Llama
    of ``shape`` (hidden, layers, heads, kv_heads, mlp, vocab)."""
    return Case(NAME, (batch, new), dtype, mode, device, {"prompt": f"{prompt[0]}-{prompt[1]}", **shape})


def demo_case(batch: int, new: int, *, rate: float, steps: int, every: int = CHECK_EVERY) -> Case:
    """A demo case (CPU, float32): ``batch`` prompts, ``new`` tokens kept each, checked every ``every`` tokens,
    on the demo's model trained for ``steps`` on its corpus with profanity injected at ``rate`` per word."""
    return Case(NAME, (batch, new), torch.float32, "demo", torch.device("cpu"),
                {"rate": rate, "steps": steps, "every": every})


def _demo_missing() -> str:
    """Why the demo cannot run here (its dependencies), or ``""``."""
    gone = [pip for mod, pip in (("better_profanity", "better-profanity"), ("profanity_check", "alt-profanity-check"))
            if importlib.util.find_spec(mod) is None]
    return f"{' and '.join(gone)} not installed (requirements-dev.txt)" if gone else ""


def cases(device: torch.device, quick: bool) -> list[Case]:
    """CUDA: decode, bf16, batch 32, prompts of 32–512 tokens, 128 new, the 1B-class shape (``quick``: 4
    layers). CPU: decode, fp32, batch 32, prompts of 8–64 tokens, 64 new, the demo's shape; the demo at rates
    0.01 and 0.03, 600 training steps (``quick``: 0.03, 100 steps), batch 32, 64 new. None without
    ``transformers`` (the model is built from its ``LlamaConfig``; it is a test/bench dependency, not kfuse's);
    no demo without its dependencies."""
    if importlib.util.find_spec("transformers") is None:
        print("kfuse.bench.backtrack: transformers is not installed; no backtrack cases", file=sys.stderr)
        return []
    if device.type == "cuda":
        shape = dict(_ONE_B, layers=4) if quick else _ONE_B
        return [case(device, torch.bfloat16, "decode", 32, 128, prompt=(32, 512), **shape)]
    out = [case(device, torch.float32, "decode", 32, 64, prompt=(8, 64), **_DEMO)]
    if why := _demo_missing():
        print(f"kfuse.bench.backtrack: {why}; no demo cases", file=sys.stderr)
        return out
    runs = [(0.03, 100)] if quick else [(0.01, 600), (0.03, 600)]
    return out + [demo_case(32, 64, rate=rate, steps=steps) for rate, steps in runs]


def bytes_moved(case: Case) -> int | None:
    """None: a whole generation has no byte floor worth a ratio."""
    return None


def flops(case: Case) -> int | None:
    """None: judged by tokens/s."""
    return None


def target(case: Case) -> float | None:
    """Decode: time ≤ 1 / 1.5 of ``transformers``' on CUDA, ≤ 1.0 on the CPU; demo: none on time (its targets
    are on ``comp/kept``: the module's docstring)."""
    if case.mode == "decode":
        return 1 / 1.5 if case.device.type == "cuda" else 1.0
    return None


def ratio_basis(case: Case, times: dict[str, float], ceilings: Ceilings) -> tuple[float, str] | None:
    """Decode: ``transformers``' generate; demo: ``plain``."""
    name = "transformers" if case.mode == "decode" else "plain"
    return (times[name], name) if name in times else None


@dataclass
class Inputs:
    """A decode case's ``transformers`` model, kfuse's model over it, and the prompts (CPU int64 tensors)."""

    hf: Any
    model: Any
    prompts: list[Tensor]
    graphed: Any = None  # kfuse-graphs: its DecodeGraphs (and cache), made by the first run


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


def make_inputs(case: Case, seed: int) -> Inputs | DemoInputs:
    """Decode: a random-initialised model for the case (seeded) and ragged prompts of ids in ``[1, vocab)``.
    Demo: the demo's trained model, prompts and check (:func:`kfuse.demos.backtrack.prepare`, seed 0)."""
    if case.mode == "demo":
        return _demo_inputs(case)
    from kfuse.models import LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    hf = _hf_model(case)
    g = torch.Generator().manual_seed(seed + 1)
    lo, hi = map(int, case.params["prompt"].split("-"))
    prompts = [torch.randint(1, case.params["vocab"], (int(n),), generator=g)
               for n in torch.randint(lo, hi + 1, (case.shape[0],), generator=g)]
    return Inputs(hf, LlamaForCausalLM.from_hf(hf), prompts)


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


# --------------------------------------------------------------------------- demo


@functools.lru_cache(maxsize=1)
def _prepared(rate: float, steps: int, batch: int) -> tuple[Any, Any, list[list[int]]]:
    """The demo's ``prepare`` (model, tokenizer, prompts), kept for the last case: ``bench/bench_backtrack.py``
    makes a case's inputs once per candidate, and the training is deterministic (the model is only read)."""
    from kfuse.demos.backtrack import prepare  # noqa: PLC0415

    return prepare(rate, steps=steps, batch=batch, progress=False)


@dataclass
class DemoInputs:
    """A demo case's :class:`kfuse.demos.backtrack.Comparison` and each method's last run (its result and the
    tokens it computed), from which the rows' figures and checks are taken."""

    case: Case
    comparison: Any
    last: dict[str, tuple[Any, int]] = field(default_factory=dict)

    def run(self, method: str) -> list[list[int]]:
        """One ``generate`` call with ``method``; its tokens."""
        self.last[method] = self.comparison.run(method)
        return self.last[method][0].tokens

    def figures(self, method: str) -> Any:
        """``method``'s :class:`~kfuse.demos.backtrack.MethodResult` from its last run (run now, once, if it has
        not run: ``kfuse``'s row reads ``plain``'s, whose row comes after it; the counts are seeded, exact)."""
        if method not in self.last:
            _one_thread(self.case, lambda: self.run(method))()
        return self.comparison.result(method, *self.last[method])


def _demo_inputs(case: Case) -> DemoInputs:
    from kfuse.demos.backtrack import Comparison  # noqa: PLC0415

    p = case.params
    hf, tok, prompts = _prepared(p["rate"], p["steps"], case.shape[0])
    return DemoInputs(case, Comparison(hf, tok, prompts, max_new_tokens=case.shape[1], check_every=p["every"]))


def _demo_extra(inp: DemoInputs, method: str) -> Callable[[float], dict[str, float]]:
    def extra(ms: float) -> dict[str, float]:
        r, plain = inp.figures(method), inp.figures("plain")
        return {"comp/kept": r.computed_per_kept, "comp/kept vs plain": r.computed_per_kept / plain.computed_per_kept,
                "kept": float(r.tokens_kept), "flagged": float(r.violations), "passes": float(r.forward_passes)}
    return extra


def _flagged_error(inp: DemoInputs, method: str) -> Callable[[Any], float]:
    """Windows of the final outputs the check flags (any: a failure)."""
    return lambda tokens: float(inp.figures(method).violations)


def _plain_error(inp: DemoInputs) -> Callable[[list[list[int]]], float]:
    """The fraction of ``plain``'s tokens that differ from the same sampling run on ``transformers``' model."""
    def check(tokens: list[list[int]]) -> float:
        from kfuse.backtrack import generate  # noqa: PLC0415
        from kfuse.demos.backtrack import DynamicCacheModel  # noqa: PLC0415

        c = inp.comparison
        theirs = _one_thread(inp.case, lambda: generate(DynamicCacheModel(c.hf_model), c.prompts, mode="plain",
                                                        **c.kw).tokens)()
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
    """Decode: ``kfuse``, ``kfuse-graphs`` (CUDA), ``transformers``; demo: :data:`DEMO_METHODS`."""
    if case.mode == "decode":
        out = [Candidate("kfuse", "backend", _one_thread(case, lambda: _kfuse_decode(case, inputs)),
                         extra=_tok_per_s(case))]
        if case.device.type == "cuda":
            out.append(Candidate("kfuse-graphs", "backend", lambda: _kfuse_decode(case, inputs, graphs=True),
                                 extra=_tok_per_s(case)))
        return out + [Candidate("transformers", "baseline", _one_thread(case, lambda: _hf_decode(case, inputs)),
                                extra=_tok_per_s(case))]
    out = []
    for method in DEMO_METHODS:
        err = _plain_error(inputs) if method == "plain" else _flagged_error(inputs, method)
        out.append(Candidate(method, "backend" if method == "kfuse" else "baseline",
                             _one_thread(case, functools.partial(inputs.run, method)), error=err,
                             extra=_demo_extra(inputs, method)))
    return out


def reference(case: Case, inputs: Inputs) -> Tensor | None:
    """Decode: each prompt's next token by the model in float64 (``[B]``); demo: None (own checks)."""
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
    demo: no flagged window left (a count: any is over), and 5 % of ``plain``'s tokens (sampling on a last-bit
    difference)."""
    if case.mode == "decode":
        return 0.0 if case.dtype == torch.float32 else 0.1
    return 0.05


def names(case: Case) -> list[str]:
    """The candidates' names for ``case``, in table order (``bench/bench_backtrack.py`` parametrizes on them)."""
    if case.mode == "demo":
        return list(DEMO_METHODS)
    return ["kfuse", "kfuse-graphs", "transformers"] if case.device.type == "cuda" else ["kfuse", "transformers"]
