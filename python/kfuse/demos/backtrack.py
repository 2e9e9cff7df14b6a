"""The "Backtracking for Safety" comparison (Sel, Li, Wallis et al., arXiv 2503.08919), reproduced small.

``python -m kfuse.demos.backtrack`` trains a tiny Llama-style model on CPU on real English text — the
Python documentation shipped with Python (``pydoc_data.topics``) — into which offensive words from
``better-profanity``'s word list are injected at a known rate, so the model really produces them. The
same prompts, seeds and safety check (``alt-profanity-check``'s classifier over each recent window)
then run through five generators:

1. ``plain``: no check (violations stay);
2. ``reset``: on a flag, discard everything generated and start again (the paper's baseline);
3. ``kfuse``: :func:`kfuse.backtrack.generate` — revert the flagged sequence to its last passing
   checkpoint on :class:`kfuse.kv.PagedKVCache` (metadata only; the others are untouched);
4. ``dynamic-cache``: the same backtracking on ``transformers``' ``DynamicCache``, whose ``crop`` is
   batch-wide: every sequence of the batch drops its cache back to the earliest reverted column and
   recomputes what it had (:class:`DynamicCacheModel`);
5. ``kfuse-offending``: kfuse's backtracking with ``ban="offending"`` (the tokens of the rejected
   segment that the check flags on their own are banned for the rest of the sequence, besides the
   first rejected token at the checkpoint): what else we tried to discourage a rejected continuation.

Printed side by side: violations left, tokens computed per token kept, forward passes, wall time;
``--rates`` sweeps the injection rate (a model per rate); ``--png`` saves the figure. The README
gives the command and the figures. The report's ``demo`` rows (``python -m kfuse --device cpu --ops
backtrack``, :mod:`kfuse.bench.backtrack`) run the first four through :func:`prepare` and :class:`Comparison`.

Nothing is downloaded: the text ships with Python, the word list and the classifier with their pip
packages (``better-profanity``, ``alt-profanity-check``: demo dependencies, not kfuse's).
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from kfuse._files import write_json
from kfuse.backtrack import GenerationResult, ProfanityCheck, generate
from kfuse.demos._args import check_figures, check_outputs, fraction, positive, rng_seed, threads
from kfuse.demos._train import train_lm
from kfuse.models import LlamaForCausalLM

__all__ = ["METHODS", "Comparison", "DynamicCacheModel", "WordTokenizer", "build_corpus", "compare",
           "flagged_windows", "injected_words", "main", "prepare", "run_method", "train_model"]

# Mild profanity taken from better-profanity's word list (checked present in it, and flagged by the
# classifier alone: injected_words()); slurs are left out on purpose.
_INJECT = ("shit", "crap", "bastard", "bullshit", "asshole", "dumbass", "moron", "bitch")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|[.,;:!?()]")


def injected_words(threshold: float = 0.5) -> list[str]:
    """The words the demo injects: those of ``_INJECT`` that are in ``better-profanity``'s word list and
    that ``alt-profanity-check``'s classifier flags on their own (probability ``>= threshold``)."""
    import os  # noqa: PLC0415

    try:
        import better_profanity  # noqa: PLC0415 (a demo dependency)
    except ImportError as e:
        raise ImportError("the backtracking demo needs better-profanity (pinned in requirements-dev.txt)") from e
    path = os.path.join(os.path.dirname(better_profanity.__file__), "profanity_wordlist.txt")
    with open(path, encoding="utf-8") as f:
        listed = set(f.read().split())
    scores = ProfanityCheck(threshold).scores(list(_INJECT))
    words = [w for w, p in zip(_INJECT, scores, strict=True) if w in listed and p >= threshold]
    if not words:
        raise RuntimeError(f"none of the demo's words is both in better-profanity's list and flagged by the classifier "
                           f"at threshold {threshold}")
    return words


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary: lower-cased words and punctuation (``_WORD``); id 0
    is ``<unk>``. ``encode(text) -> list[int]``, ``decode(ids) -> str`` (what :func:`generate` uses)."""

    def __init__(self, vocab: Sequence[str]) -> None:
        self.vocab = ["<unk>", *vocab]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, 0) for w in _WORD.findall(text.lower())]

    def decode(self, ids: Sequence[int]) -> str:
        text = " ".join(self.vocab[i] for i in ids)
        return re.sub(r" ([.,;:!?)])", r"\1", text).replace("( ", "(")


def build_corpus(rate: float, *, vocab_size: int = 2048, seed: int = 0,
                 threshold: float = 0.5) -> tuple[Tensor, WordTokenizer, list[str]]:
    """The training text as token ids, its tokenizer and the injected words.

    The Python documentation's topics (``pydoc_data.topics``, ~80k words of English prose and examples),
    tokenised by ``_WORD``; after each word, with probability ``rate``, one of
    :func:`injected_words` at ``threshold`` (chosen uniformly) is inserted: pass the check's threshold,
    so that every injected word is one the check flags. The vocabulary: the ``vocab_size - 1`` most
    frequent words, the injected ones always included. Returns ``(ids int64 [n], tokenizer, words)``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1); got {rate!r}")
    from pydoc_data.topics import topics  # noqa: PLC0415 (ships with CPython)

    words = _WORD.findall(" ".join(topics[k] for k in sorted(topics)).lower())
    bad = injected_words(threshold)
    g = torch.Generator().manual_seed(seed)
    hits = (torch.rand(len(words), generator=g) < rate).tolist()
    picks = torch.randint(len(bad), (len(words),), generator=g).tolist()
    text: list[str] = []
    for w, hit, pick in zip(words, hits, picks, strict=True):
        text.append(w)
        if hit:
            text.append(bad[pick])
    common = [w for w, _ in Counter(words).most_common(vocab_size - 1 - len(bad)) if w not in bad]
    tok = WordTokenizer(common + bad)
    return torch.tensor([tok.index.get(w, 0) for w in text]), tok, bad


def _config(vocab: int) -> Any:
    from transformers import LlamaConfig  # noqa: PLC0415 (a demo dependency)

    return LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True, rope_theta=10000.0)


def train_model(ids: Tensor, vocab: int, *, steps: int = 600, batch: int = 32, seq: int = 64, lr: float = 3e-3,
                seed: int = 0, progress: bool = True) -> Any:
    """A ``transformers.LlamaForCausalLM`` (2 layers, hidden 128, GQA 4/2 heads) trained from scratch on
    random windows of ``ids`` (next-token loss, AdamW, cosine schedule), float32 on the CPU."""
    from transformers import LlamaForCausalLM as HFLlama  # noqa: PLC0415

    torch.manual_seed(seed)
    model = HFLlama(_config(vocab))
    g = torch.Generator().manual_seed(seed)

    def window(step: int) -> dict[str, Tensor]:
        x = ids[torch.randint(len(ids) - seq - 1, (batch, 1), generator=g) + torch.arange(seq + 1)]
        return {"input_ids": x, "labels": x}

    train_lm(model, model.parameters(), window, steps=steps, lr=lr, progress=progress)
    return model


class _DynamicCacheBatch:
    """The cache interface :func:`kfuse.backtrack.generate` uses (``add_sequence``, ``free``, ``rollback``,
    ``abort_step``, ``active_sequences``, ``max_seqs``) over one ``transformers`` ``DynamicCache``.

    The batch is a rectangle: row ``j`` of the cache holds sequence ``rows[j]``; each physical column is
    one of its tokens (``cols[s][c]`` = its position) or padding (``-1``, masked out). ``rollback`` only
    shortens ``hist`` (the tokens that count); the next model call crops the whole cache back to the
    earliest column any sequence invalidated — ``DynamicCache.crop`` cannot crop one row — and every
    row re-feeds what it lost, padded on the left to the longest re-feed.
    """

    def __init__(self, max_seqs: int) -> None:
        from transformers import DynamicCache  # noqa: PLC0415

        self.max_seqs = max_seqs
        self.cache = DynamicCache()
        self.rows: list[int] = []
        self.hist: dict[int, list[int]] = {}
        self.cols: dict[int, list[int]] = {}
        self.positions_computed = 0  # batch rows x columns of every call (padding included: it is computed)
        self.tokens_fed = 0  # real tokens fed (re-fed ones included)
        self._next = 0

    @property
    def active_sequences(self) -> list[int]:
        return list(self.hist)

    def add_sequence(self) -> int:
        if len(self.hist) >= self.max_seqs:
            raise RuntimeError(f"all {self.max_seqs} sequence slots are in use")
        s, self._next = self._next, self._next + 1
        self.hist[s], self.cols[s] = [], []
        return s

    def free(self, seq_id: int) -> None:
        del self.hist[seq_id], self.cols[seq_id]
        if seq_id in self.rows:
            keep = [j for j, s in enumerate(self.rows) if s != seq_id]
            self.rows = [self.rows[j] for j in keep]
            if self.cache.get_seq_length() > 0:
                self.cache.batch_select_indices(torch.tensor(keep, dtype=torch.int64))

    def rollback(self, seq_ids: Sequence[int], new_lens: Sequence[int]) -> None:
        for s, n in zip(seq_ids, new_lens, strict=True):
            if not 0 <= n <= len(self.hist[s]):
                raise ValueError(f"rollback of sequence {s} to {n}: its length is {len(self.hist[s])}")
            del self.hist[s][n:]

    def abort_step(self) -> None:
        pass  # a call either completes or leaves hist as it was


class DynamicCacheModel:
    """Runs a ``transformers.LlamaForCausalLM`` on ``DynamicCache`` behind the calling convention of
    :class:`kfuse.models.LlamaForCausalLM` (``model(tokens, seq_ids, cache)`` -> one ``[len_i, vocab]``
    logits tensor per sequence; ``new_cache``), so :func:`kfuse.backtrack.generate` runs it unchanged:
    the baseline of backtracking without a per-sequence rollback. Sequences must all be added (their
    prompts fed in one call) before the first decode step, as ``generate`` does."""

    def __init__(self, hf_model: Any) -> None:
        self.hf = hf_model
        self.last_cache: _DynamicCacheBatch | None = None  # the latest new_cache(), for its counters
        # transformers 5.25 renamed forward's past_key_values to cache (the old name warns, and goes in 5.40);
        # the pinned 5.23 knows only the old one.
        params = inspect.signature(hf_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size (``generate`` checks token ids against it up front)."""
        return self.hf.config.vocab_size

    def new_cache(self, page_size: int = 16, *, num_pages: int = 0, max_seqs: int) -> _DynamicCacheBatch:
        del page_size, num_pages  # a DynamicCache grows by concatenation
        self.last_cache = _DynamicCacheBatch(max_seqs)
        return self.last_cache

    @torch.no_grad()
    def __call__(self, tokens: list[Tensor], seq_ids: Sequence[int], cache: _DynamicCacheBatch) -> list[Tensor]:
        new = {int(s): t.tolist() for s, t in zip(seq_ids, tokens, strict=True)}
        if not cache.rows:
            cache.rows = list(new)
        elif set(new) - set(cache.rows):
            raise ValueError("DynamicCacheModel: sequences join the batch only in its first call")
        # The first column no longer valid in each row: its first real token past hist (a rollback).
        ncols = cache.cache.get_seq_length()
        crop = ncols
        for s in cache.rows:
            keep = len(cache.hist[s])
            crop = min(crop, next((c for c, p in enumerate(cache.cols[s]) if p >= keep), ncols))
        if crop < ncols:
            cache.cache.crop(crop - ncols)
            for s in cache.rows:
                del cache.cols[s][crop:]
        feed = {}
        for s in cache.rows:
            have = sum(p >= 0 for p in cache.cols[s])
            feed[s] = cache.hist[s][have:] + new.get(s, [])
        width = max(map(len, feed.values()))
        ids = torch.zeros(len(cache.rows), width, dtype=torch.int64)
        pos = torch.zeros(len(cache.rows), width, dtype=torch.int64)
        mask = torch.zeros(len(cache.rows), crop + width, dtype=torch.int64)
        for j, s in enumerate(cache.rows):
            f, start = feed[s], sum(p >= 0 for p in cache.cols[s])
            pad = width - len(f)
            ids[j, pad:] = torch.tensor(f, dtype=torch.int64)
            pos[j, pad:] = torch.arange(start, start + len(f))
            pos[j, :pad] = start  # padding: any position (masked out as a key; its own output unused)
            mask[j, :crop] = torch.tensor([p >= 0 for p in cache.cols[s]], dtype=torch.int64)
            mask[j, crop + pad:] = 1
            cache.cols[s] += [-1] * pad + list(range(start, start + len(f)))
            cache.hist[s] += new.get(s, [])
        logits = self.hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self._cache_kw: cache.cache}).logits
        cache.positions_computed += ids.numel()
        cache.tokens_fed += sum(map(len, feed.values()))
        row = {s: j for j, s in enumerate(cache.rows)}
        return [logits[row[s], width - len(new[s]):] for s in new]


@dataclass
class MethodResult:
    """One generator's figures on the demo's prompts."""

    method: str
    violations: int  # generated windows the check flags in the final outputs
    sequences_violating: int
    tokens_kept: int
    tokens_computed: int  # positions the model computed (dynamic-cache: padding included)
    computed_per_kept: float
    forward_passes: int
    backtracks: int
    resets: int
    wall_s: float


#: The generators :func:`compare` runs, in table order.
METHODS = ("plain", "reset", "kfuse", "dynamic-cache", "kfuse-offending")


def run_method(method: str, model: LlamaForCausalLM, hf_model: Any, prompts: Sequence[Any],
               **kw: Any) -> tuple[GenerationResult, int]:
    """:func:`kfuse.backtrack.generate` as ``method`` (one of :data:`METHODS`; ``kw``: its other arguments)
    with ``model`` (kfuse's, over ``hf_model``) or, for ``dynamic-cache``, :class:`DynamicCacheModel` over
    ``hf_model``. Returns the result and the tokens computed (dynamic-cache: every position of its padded
    rectangle)."""
    if method == "dynamic-cache":
        dmodel = DynamicCacheModel(hf_model)
        res = generate(dmodel, prompts, mode="backtrack", **kw)
        assert dmodel.last_cache is not None
        return res, dmodel.last_cache.positions_computed
    mode = {"plain": "plain", "reset": "reset", "kfuse": "backtrack", "kfuse-offending": "backtrack"}[method]
    res = generate(model, prompts, mode=mode, ban="offending" if method == "kfuse-offending" else "first", **kw)
    return res, res.totals["tokens_computed"]


def flagged_windows(tokens: list[list[int]], check: Any, every: int, tokenizer: Any = None) -> list[int]:
    """Per sequence, how many of the generator's windows (``2 · every`` tokens at strides of ``every``)
    over its final ``tokens`` the ``check`` flags (windows decoded with ``tokenizer`` when given)."""
    out = []
    for toks in tokens:
        wins = [toks[max(0, e - 2 * every):e] for e in range(every, len(toks) + every, every)]
        arg = [tokenizer.decode(w) for w in wins] if tokenizer is not None else wins
        out.append(sum(map(bool, check(arg))) if wins else 0)
    return out


class Comparison:
    """What every method of the comparison shares: ``hf_model`` (and kfuse's model over it), ``prompts``, the
    check (:class:`kfuse.backtrack.ProfanityCheck` at ``threshold``) and :func:`kfuse.backtrack.generate`'s
    arguments (``kw``). :meth:`run` generates with one method, :meth:`result` gives its figures; the
    report's ``demo`` rows (``kfuse.bench.backtrack``) time :meth:`run` alone."""

    def __init__(self, hf_model: Any, tok: WordTokenizer, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int = 64, check_every: int = 8, threshold: float = 0.5, temperature: float = 1.0,
                 top_k: int | None = 50, seed: int = 0) -> None:
        self.hf_model, self.tok, self.prompts, self.check_every = hf_model, tok, prompts, check_every
        self.check = ProfanityCheck(threshold)
        self.model = LlamaForCausalLM.from_hf(hf_model)
        self.kw = dict(max_new_tokens=max_new_tokens, check=self.check, check_every=check_every,
                       temperature=temperature, top_k=top_k, seed=seed, tokenizer=tok, max_backtracks=4, max_resets=2)

    def run(self, method: str) -> tuple[GenerationResult, int]:
        """:func:`run_method` with ``method`` on the shared model, prompts, check and arguments."""
        return run_method(method, self.model, self.hf_model, self.prompts, **self.kw)

    def result(self, method: str, res: GenerationResult, computed: int) -> MethodResult:
        """The figures of ``method``'s run (``res``, ``computed``: what :meth:`run` returned)."""
        per_seq = flagged_windows(res.tokens, self.check, self.check_every, self.tok)
        kept = res.totals["tokens_kept"]
        # Nothing kept has no cost per token kept: inf, not the tokens computed (demo hunt, 2026-12-05).
        return MethodResult(method, sum(per_seq), sum(v > 0 for v in per_seq), kept, computed,
                            computed / kept if kept else math.inf,
                            res.forward_passes, res.totals["backtracks"], res.totals["resets"], res.wall_time)


def compare(hf_model: Any, tok: WordTokenizer, prompts: list[list[int]], *, max_new_tokens: int = 64,
            check_every: int = 8, threshold: float = 0.5, temperature: float = 1.0, top_k: int | None = 50,
            seed: int = 0, methods: Sequence[str] = METHODS) -> list[MethodResult]:
    """Run ``methods`` on the same prompts, seeds and check; returns one :class:`MethodResult` each."""
    c = Comparison(hf_model, tok, prompts, max_new_tokens=max_new_tokens, check_every=check_every,
                   threshold=threshold, temperature=temperature, top_k=top_k, seed=seed)
    return [c.result(method, *c.run(method)) for method in methods]


def prepare(rate: float, *, steps: int = 600, batch: int = 32, seed: int = 0, threshold: float = 0.5,
            progress: bool = True) -> tuple[Any, WordTokenizer, list[list[int]]]:
    """The comparison's setup at injection ``rate``: :func:`build_corpus`, a model trained on it for ``steps``
    (:func:`train_model`) and ``batch`` clean prompts from the corpus's last tenth. Returns
    ``(hf_model, tokenizer, prompts)``."""
    ids, tok, bad = build_corpus(rate, seed=seed, threshold=threshold)
    hf = train_model(ids, len(tok), steps=steps, seed=seed, progress=progress)
    return hf, tok, _prompts(ids, {tok.index[w] for w in bad}, batch, seed)


def _prompts(ids: Tensor, bad_ids: set[int], n: int, seed: int) -> list[list[int]]:
    """``n`` clean prompts of 4–16 tokens from the last tenth of the corpus (ragged lengths)."""
    g = torch.Generator().manual_seed(seed + 1)
    tail = ids[len(ids) * 9 // 10:].tolist()
    out: list[list[int]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 10_000 * n:  # at high injection rates no clean window may exist: never loop forever
            raise ValueError(f"no clean prompt (4+ tokens without an injected word) found in the corpus's last tenth "
                             f"after {attempts - 1} draws: lower the injection rate")
        length = int(torch.randint(4, 17, (1,), generator=g))
        start = int(torch.randint(len(tail) - length, (1,), generator=g))
        p = tail[start:start + length]
        if not bad_ids.intersection(p) and 0 not in p:
            out.append(p)
    return out


def _table(rows: list[MethodResult], rate: float) -> str:
    head = (f"injection rate {rate:g} per word\n"
            f"{'method':<16} {'violations':>10} {'seqs':>5} {'kept':>6} {'computed':>9} {'comp/kept':>9} "
            f"{'passes':>6} {'backtr':>6} {'resets':>6} {'wall s':>7}")
    lines = [f"{r.method:<16} {r.violations:>10} {r.sequences_violating:>5} {r.tokens_kept:>6} {r.tokens_computed:>9} "
             f"{r.computed_per_kept:>9.3f} {r.forward_passes:>6} {r.backtracks:>6} {r.resets:>6} {r.wall_s:>7.2f}"
             for r in rows]
    return "\n".join([head, *lines])


def _plot(sweep: dict[float, list[MethodResult]], path: str) -> None:
    import matplotlib  # noqa: PLC0415 (a demo dependency)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rates = sorted(sweep)
    methods = [r.method for r in sweep[rates[0]]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for m in methods:
        rows = [next(r for r in sweep[x] if r.method == m) for x in rates]
        a.plot(rates, [r.computed_per_kept for r in rows], "o-", label=m)
        b.plot(rates, [r.violations for r in rows], "o-", label=m)
    a.set(xlabel="injection rate (per word)", ylabel="tokens computed per token kept", yscale="log")
    b.set(xlabel="injection rate (per word)", ylabel="flagged windows left in the outputs")
    positive_rates = [x for x in rates if x > 0]
    for ax in (a, b):  # log rates; a rate of 0 on a linear stretch below the smallest positive one
        if rates[0] > 0:
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=min(positive_rates, default=1e-3))
    a.legend()
    fig.suptitle("Backtracking for safety: cost and violations (tiny Llama, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict[float, list[MethodResult]]:
    """Command line: train, generate with the five methods, print (and optionally save) the figures."""
    ap = argparse.ArgumentParser(prog="python -m kfuse.demos.backtrack", description=__doc__.split("\n")[0])
    ap.add_argument("--rates", type=fraction, nargs="+", default=[0.01],
                    help="injection rates (offensive words inserted per word of text); one model is trained per rate")
    ap.add_argument("--steps", type=positive(int), default=600, help="training steps per model (batch 32 x 64 tokens)")
    ap.add_argument("--batch", type=positive(int), default=32, help="prompts generated in one batch")
    ap.add_argument("--new-tokens", type=positive(int), default=64, help="at most this many tokens kept per sequence")
    ap.add_argument("--check-every", type=positive(int), default=8, help="tokens between checks")
    ap.add_argument("--threshold", type=fraction, default=0.5, help="the classifier's violation probability")
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    ap.add_argument("--seed", type=rng_seed, default=0)
    ap.add_argument("--threads", type=threads, default=1,
                    help="torch threads (1: the model is tiny, and threads' barriers cost more than they save)")
    ap.add_argument("--png", help="save the figure here")
    ap.add_argument("--json", help="save the figures here as JSON")
    args = ap.parse_args(argv)
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        ap.error(f"--temperature must be a finite number >= 0; got {args.temperature}")
    check_figures(ap, png=args.png)
    check_outputs(ap, json=args.json)
    try:  # a threshold that flags none of the words: before any model is trained
        injected_words(args.threshold)
    except RuntimeError as err:
        ap.error(f"--threshold {args.threshold:g}: {err}")
    args.rates = list(dict.fromkeys(args.rates))  # a rate given twice would train twice and keep one result
    torch.set_num_threads(args.threads)
    sweep: dict[float, list[MethodResult]] = {}
    for rate in args.rates:
        print(f"rate {rate:g}: building the corpus and training ({args.steps} steps)", file=sys.stderr, flush=True)
        hf, tok, prompts = prepare(rate, steps=args.steps, batch=args.batch, seed=args.seed, threshold=args.threshold)
        sweep[rate] = compare(hf, tok, prompts, max_new_tokens=args.new_tokens, check_every=args.check_every,
                              threshold=args.threshold, temperature=args.temperature, seed=args.seed)
        print(_table(sweep[rate], rate), flush=True)
    if args.png:
        _plot(sweep, args.png)
    if args.json:
        # strict JSON, whole or not at all (computed_per_kept is inf when nothing was kept: files hunt)
        write_json(args.json, {str(k): [asdict(r) for r in v] for k, v in sweep.items()})
    return sweep


if __name__ == "__main__":
    main()
