"""Backtracking generation on :class:`kfuse.kv.PagedKVCache`.

After Sel, Li, Wallis et al., "Backtracking for Safety" (arXiv 2503.08919): every ``check_every``
generated tokens a pluggable check scores each sequence's recent window; a flagged sequence reverts to
its last checkpoint that passed (not to the start), the rejected continuation's first token is banned
at that position, and it continues. ``mode="reset"`` (discard everything generated on a flag) and
``mode="plain"`` (no check) run the baselines through the same code.

How it uses the cache: all live sequences step together, one ``model(tokens, seq_ids, cache)`` call
per step (each feeds one token). A checkpoint is a number of generated tokens ``c``; reverting to it
is ``cache.rollback`` to length ``prompt + c − 1`` (metadata only) and re-feeding the token at
``prompt + c − 1``, whose logits are the checkpoint's next-token distribution. Re-feeding one token
instead of storing a vocabulary-sized logits row per checkpoint keeps every step's batch shape equal
to a run without flags: each live sequence feeds exactly one token per call, so the other sequences'
CPU GEMM rows (whose bits depend on the number of rows) are unaffected by a sequence backtracking.

Checks: any callable taking a list of windows (texts when a ``tokenizer`` is given, else lists of
token ids) and returning one bool (True = violation) or numeric score (violation when ``>= threshold``)
per window. :class:`WordListCheck` is deterministic (tests); :class:`ProfanityCheck` wraps the
``alt-profanity-check`` classifier (a test/demo dependency, imported lazily).
"""

from __future__ import annotations

import itertools
import math
import numbers
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from kfuse import _checks
from kfuse.kv import PagedKVCache

__all__ = ["GenerationResult", "ProfanityCheck", "SequenceStats", "WordListCheck", "generate"]

Check = Callable[[list[Any]], Sequence[Any]]

_GEN = "kfuse.backtrack.generate"  # the prefix of generate()'s errors


@dataclass
class SequenceStats:
    """Counters of one sequence. Invariants (for every sequence, every mode; tested):

    - ``tokens_kept == len(result.tokens[i])``; ``tokens_sampled == tokens_kept + tokens_discarded``;
    - ``forward_passes == tokens_sampled`` (the prefill, then one call per step the sequence stays
      live, and it samples once per step);
    - ``tokens_computed == prompt_tokens + tokens_sampled − 1`` (each step but the last feeds one
      token: the one just sampled, or the checkpoint's token re-fed after a rollback);
    - ``flags == backtracks + resets + (finish_reason == "limit")`` (every flag reverts or stops);
    - ``mode="plain"``: ``checks == backtracks == resets == tokens_discarded == 0``; ``mode="reset"``:
      ``backtracks == 0``.

    :class:`GenerationResult` adds ``totals`` (sums of these counters) and ``forward_passes`` (model
    calls), which equals the largest per-sequence ``forward_passes``: every call serves every live
    sequence.
    """

    prompt_tokens: int = 0
    tokens_kept: int = 0
    tokens_discarded: int = 0  # sampled, then thrown away by a backtrack, a reset or a stop
    tokens_sampled: int = 0
    tokens_computed: int = 0  # tokens fed to the model (prompt and re-fed tokens included)
    forward_passes: int = 0  # model calls this sequence took part in
    checks: int = 0
    flags: int = 0  # checks that found a violation (each causes a backtrack, a reset or a stop)
    backtracks: int = 0
    resets: int = 0
    finish_reason: str = ""  # "length", "eos", or "limit" (stopped by the backtrack/reset limits)


@dataclass
class GenerationResult:
    """What :func:`generate` returns.

    ``tokens[i]``: sequence ``i``'s generated token ids (prompt excluded; each of them was inside a
    window that passed the check, except in ``mode="plain"``). ``texts``: their decoding when a
    tokenizer was given. ``forward_passes``: model calls in total (a call serves every live sequence);
    ``wall_time``: seconds.
    """

    tokens: list[list[int]]
    texts: list[str] | None
    stats: list[SequenceStats]
    forward_passes: int
    wall_time: float
    totals: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        # Sums of the per-sequence integer counters (finish_reason excluded).
        self.totals = {f.name: sum(getattr(s, f.name) for s in self.stats)
                       for f in fields(SequenceStats) if f.name != "finish_reason"}


class WordListCheck:
    """Flags a window that contains any of ``words``: token-id sequences (matched contiguously in id
    windows) or strings (matched case-insensitively as whole words in text windows). Deterministic."""

    def __init__(self, words: Sequence[str | Sequence[int]]) -> None:
        if isinstance(words, str) or not isinstance(words, Sequence):
            raise TypeError(f"kfuse.backtrack.WordListCheck: words must be a list of strings or token-id sequences; "
                            f"got {type(words).__name__}")
        if not words:
            raise ValueError("kfuse.backtrack.WordListCheck: words must not be empty")
        entries = [_word_entry(j, w) for j, w in enumerate(words)]
        self.texts = [w for w in entries if isinstance(w, str)]
        self.ids = [w for w in entries if not isinstance(w, str)]
        # One-token entries by set lookup: scanning 41 of them cost 0.29 s of a 1.5 s backtracking run
        # of kfuse.bench.backtrack (543 windows, profiled).
        self._single = {p[0] for p in self.ids if len(p) == 1}
        self._multi = [p for p in self.ids if len(p) > 1]
        if any(not w for w in entries):
            raise ValueError(f"kfuse.backtrack.WordListCheck: words must not hold an empty entry; got {words!r}")
        # Whole words: no word character just before or after. Not \b, which needs a word character on the
        # entry's side too, so entries that start or end with another character ("@ss", "a$$") never matched
        # on their own, and "a$$" matched inside "a$$hole".
        self._pattern = (re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, self.texts)) + r")(?!\w)", re.IGNORECASE)
                         if self.texts else None)

    def __call__(self, windows: list[str] | list[list[int]]) -> list[bool]:
        return [self._flag(w) for w in windows]

    def _flag(self, window: str | list[int]) -> bool:
        if isinstance(window, str):
            if self.ids and self._pattern is None:
                raise TypeError("WordListCheck holds token-id sequences but got text windows (generate() passes "
                                "text when a tokenizer is given)")
            return self._pattern is not None and self._pattern.search(window) is not None
        if self.texts and not self.ids:
            raise TypeError("WordListCheck holds words but got token-id windows (pass a tokenizer to generate())")
        w = tuple(window)
        return (not self._single.isdisjoint(w)
                or any(w[j:j + len(p)] == p for p in self._multi for j in range(len(w) - len(p) + 1)))


def _is_int(t: object) -> bool:
    """A Python or numpy integer (bools, Python's or numpy's, are not token ids)."""
    return isinstance(t, (int, np.integer)) and not isinstance(t, bool)


def _word_entry(j: int, w: object) -> str | tuple[int, ...]:
    """``words[j]`` of :class:`WordListCheck`: a string, or a sequence (list, tuple, 1-D array) of int ids."""
    if isinstance(w, str):
        return w
    ids = w.tolist() if isinstance(w, (np.ndarray, Tensor)) else w
    if not isinstance(ids, Sequence) or isinstance(ids, str) or not all(map(_is_int, ids)):
        raise TypeError(f"kfuse.backtrack.WordListCheck: words[{j}] must be a string or a sequence of int token ids; "
                        f"got {w!r}")
    return tuple(int(t) for t in ids)


class ProfanityCheck:
    """Offensive-language check: ``alt-profanity-check``'s classifier (a calibrated linear SVM over word
    TF-IDF, trained on human-labelled offensive / clean text; runs offline). Flags a text window whose
    probability of being offensive is ``>= threshold``. Needs text windows (a tokenizer in
    :func:`generate`). ``alt-profanity-check`` is a test/demo dependency, not one of kfuse's."""

    def __init__(self, threshold: float = 0.5) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1]; got {threshold!r}")
        try:
            from profanity_check import predict_prob  # noqa: PLC0415 (optional: a demo/test dependency)
        except ImportError as e:
            raise ImportError("ProfanityCheck needs the alt-profanity-check package (pinned in requirements-dev.txt): "
                              "pip install alt-profanity-check") from e
        self.threshold = float(threshold)
        self._predict_prob = predict_prob

    def scores(self, texts: list[str]) -> list[float]:
        """Probability that each text is offensive."""
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("ProfanityCheck scores text; generate() passes text windows only when given a tokenizer")
        return [float(p) for p in self._predict_prob(list(texts))] if texts else []

    def __call__(self, texts: list[str]) -> list[bool]:
        return [p >= self.threshold for p in self.scores(texts)]


def _seeded_generator(seed: int, index: int) -> torch.Generator:
    # SeedSequence mixes (seed, index) so that nearby pairs give unrelated streams.
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1))
    return g


def _sample(rows: Tensor, banned: list[set[int]], temperature: float, top_k: int | None, top_p: float,
            gens: list[torch.Generator], seqs: list[int] | None = None) -> list[int]:
    """One token per row of float32 CPU logits ``rows [L, vocab]``: row ``r``'s ``banned[r]`` ids removed,
    then greedy (``temperature == 0``) or temperature / top-k / top-p sampling, row ``r`` drawing one
    uniform number from ``gens[r]`` (inverse CDF), so a sequence's draws do not depend on the batch.
    ``seqs``: the rows' prompt indices, for errors (default: the rows').

    Batched over the rows: sampling row by row (``torch.multinomial`` per row) took a third of a
    backtracking run of ``kfuse.bench.backtrack`` (0.48 of 1.5 s, 2296 rows, profiled)."""
    if any(banned):
        rows = rows.clone()
        for r, b in enumerate(banned):
            if b:
                rows[r, list(b)] = float("-inf")
    # Non-finite logits (a masked vocabulary, a half-precision overflow): +inf takes all the probability
    # (the softmax's limit: the +inf tokens equally likely), and a row with no token above -inf (the model's
    # and the bans together) is an error. The +inf rows' shift made every logit NaN, and the sampler drew an
    # arbitrary token; an all -inf row gave id 0 or the last, banned or not (generator hunt, 2026-12-05).
    top = rows.amax(-1, keepdim=True)
    if not torch.isfinite(top).all():
        stuck = torch.nonzero(top.squeeze(1) == float("-inf")).flatten().tolist()
        if stuck:
            raise ValueError(f"{_GEN}: no token to draw for prompts {[r if seqs is None else seqs[r] for r in stuck]}: "
                             "every token not banned has a -inf logit (the model's logits with the bans after a "
                             "flag)")
        inf = top == float("inf")
        rows = torch.where(inf, torch.where(rows == float("inf"), 0.0, float("-inf")), rows)
        top = torch.where(inf, 0.0, top)
    if rows.new_tensor(temperature) == 0:  # also a positive one below float32's smallest, 0 in the logits' dtype
        return rows.argmax(-1).tolist()
    # Shifted by the best allowed logit, so that a tiny temperature cannot overflow it to inf; a huge one
    # (inf in float32) turns a banned -inf into NaN, put back to -inf. A NaN cdf picked the last id,
    # banned or not.
    rows = ((rows - top) / temperature).nan_to_num_(nan=float("-inf"))
    if top_k is not None and top_k < rows.shape[1]:
        rows = rows.masked_fill(rows < rows.topk(top_k, -1).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = rows.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
        drop[:, 0] = False  # the top one stays (top_p below float32's smallest number compared as 0)
        rows = rows.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    cdf = rows.softmax(-1).double().cumsum(-1)
    # (on the CPU, as the generators: under torch.set_default_device(...) rand drew on that device; globals hunt)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device="cpu") for g in gens])
    # The first token whose cumulative mass exceeds u · total: never one of probability 0 (its cdf equals
    # the previous token's, which would have been first).
    picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return picks.clamp_(max=rows.shape[1] - 1).tolist()


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int (numpy and 0-d tensor integers too: error-message hunt) of at least ``minimum``."""
    i = _checks.int_or_none(value)
    if i is None or i < minimum:
        raise ValueError(f"{_GEN}: {name} must be an int >= {minimum}; got {value!r}")
    return i


def _is_finite_real(value: object) -> bool:
    # NaN passes every comparison-based range check (nan < 0 is False), so finiteness is checked on its own.
    try:
        _checks.real(_GEN, "", value, finite=True)
    except (TypeError, ValueError):  # (10**400 is a Real whose math.isfinite raised OverflowError)
        return False
    return True


def _check_ids(name: str, ids: list[int], vocab: int | None) -> None:
    """Token ids the model can embed: in ``[0, vocab)``; only ``>= 0`` when the model does not say its
    vocabulary size."""
    bad = sorted({t for t in ids if t < 0 or (vocab is not None and t >= vocab)})
    if bad:
        span = f"[0, vocab_size={vocab})" if vocab is not None else "[0, vocab_size)"
        raise ValueError(f"{_GEN}: {name} must hold token ids in {span}; outside it: {bad[:8]}")


_PROMPT_TYPES = "a list of int token ids, a 1-D integer tensor or numpy array, or a string (with a tokenizer)"


def _prompt_ids(prompts: Sequence[Any], tokenizer: Any, vocab: int | None) -> list[list[int]]:
    if isinstance(prompts, (str, Tensor, np.ndarray)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"{_GEN}: prompts must be a non-empty list with one prompt per sequence, each "
                         f"{_PROMPT_TYPES}; got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"{_GEN}: prompts[{i}] is a string; pass a tokenizer to encode it")
            if not callable(getattr(tokenizer, "encode", None)):
                raise TypeError(f"{_GEN}: tokenizer has no encode() for the string prompts[{i}]; got "
                                f"{type(tokenizer).__name__}")
            p = tokenizer.encode(p)
        ids = p.tolist() if isinstance(p, (Tensor, np.ndarray)) else p
        if isinstance(ids, str) or not isinstance(ids, Sequence) or not ids or not all(map(_is_int, ids)):
            raise ValueError(f"{_GEN}: prompts[{i}] must be {_PROMPT_TYPES}, holding at least one id; got {p!r}")
        ids = [int(t) for t in ids]
        _check_ids(f"prompts[{i}]", ids, vocab)
        out.append(ids)
    return out


def _pages(lengths: list[int], page_size: int) -> int:
    """Cache pages that sequences of these lengths hold at once."""
    return sum(-(-n // page_size) for n in lengths)


def _check_cache(cache: object, longest: list[int]) -> None:
    """A caller's cache: free slots and pages for sequences of ``longest`` tokens, and no open step (its
    owner's step, which generate's cleanup would otherwise abort)."""
    if not isinstance(cache, PagedKVCache):
        raise ValueError(f"{_GEN}: cache must be a kfuse.kv.PagedKVCache or None; got {type(cache).__name__}")
    cache._no_step(f"{_GEN}: cache")
    free_slots = cache.max_seqs - len(cache.active_sequences)
    if free_slots < len(longest):
        raise ValueError(f"{_GEN}: cache has {free_slots} free sequence slots; {len(longest)} prompts need one each")
    cap = cache.max_pages_per_seq * cache.page_size
    if max(longest) > cap:
        raise ValueError(f"{_GEN}: cache holds at most {cap} tokens per sequence; the longest prompt + "
                         f"max_new_tokens - 1 is {max(longest)}")
    need, free = _pages(longest, cache.page_size), cache.stats()["pages_free"]
    if need > free:
        raise ValueError(f"{_GEN}: cache has {free} free pages of {cache.page_size} tokens; the prompts may need "
                         f"{need} (each prompt + max_new_tokens - 1 tokens at once)")


def _check_flag_room(max_flags: int, vocab: int) -> None:
    # Each flag bans one token after one prefix, and a sequence flags at most max_flags times: if that
    # cannot exhaust the vocabulary, some token is always left to sample.
    if max_flags >= vocab:
        raise ValueError(f"{_GEN}: max_backtracks / max_resets allow {max_flags} bans after one prefix; the "
                         f"vocabulary has only {vocab} tokens")


def generate(model: Any, prompts: Sequence[Any], *, max_new_tokens: int, check: Check | None = None,
             mode: Literal["backtrack", "reset", "plain"] = "backtrack", check_every: int = 8,
             window: int | None = None, threshold: float = 0.5, max_backtracks: int = 4, max_resets: int = 1,
             on_limit: Literal["reset", "stop"] = "reset", temperature: float = 0.0, top_k: int | None = None,
             top_p: float = 1.0, seed: int = 0, tokenizer: Any = None, eos_token_id: int | None = None,
             cache: PagedKVCache | None = None, progress: bool | int = False,
             ban: Literal["first", "offending"] = "first", decode_graphs: bool = False) -> GenerationResult:
    """Generate from ``prompts`` in one batch, backtracking sequences whose recent window fails ``check``.

    Args:
        model: a decoder on the paged cache (``kfuse.models.LlamaForCausalLM``): ``model(tokens, seq_ids,
            cache)`` returns one ``[len_i, vocab]`` logits tensor per sequence; ``model.new_cache`` when
            ``cache`` is None. When it has an int ``vocab_size``, token ids (prompts, ``eos_token_id``) are
            checked against it up front.
        prompts: a list, one prompt per sequence: token ids (a list of Python or numpy ints, a 1-D integer
            tensor or numpy array) or a string (encoded with ``tokenizer.encode``); each non-empty.
        max_new_tokens: tokens each sequence keeps at most.
        check: called with a list of windows (``tokenizer.decode``-d texts when a tokenizer is given,
            else token-id lists); returns one bool (True = violation) or real score (violation when
            ``>= threshold``; NaN is refused) per window. Required unless ``mode="plain"``.
        mode: ``"backtrack"`` (revert to the last checkpoint that passed), ``"reset"`` (revert to the
            prompt, the baseline that discards everything generated) or ``"plain"`` (no check).
        check_every: a sequence is checked after every ``check_every`` new tokens since its last
            passing checkpoint, and when it ends (EOS or ``max_new_tokens``) with unchecked tokens.
        window: the check sees the last ``window`` generated tokens (default ``2 · check_every``, so a
            word across a checkpoint is seen whole); never the prompt, which reverting cannot change.
            At least ``check_every``, so every token since the last passing checkpoint is checked.
        threshold: a score ``>= threshold`` is a violation (any finite real: the scale is the check's).
        max_backtracks: backtracks a sequence may make since its last reset; the flag after them
            triggers ``on_limit``: ``"reset"`` (revert to the prompt, if fewer than ``max_resets`` resets
            happened, else stop) or ``"stop"`` (end the sequence at its last passing checkpoint). In
            ``mode="reset"`` every flag resets, and the flag after ``max_resets`` resets stops.
        temperature, top_k, top_p: ``temperature == 0`` is greedy (so is one below 1.4e-45, 0 in the
            float32 logits); else softmax sampling at that
            temperature restricted to the ``top_k`` most likely tokens and the top-``top_p`` mass.
        seed: each sequence ``i`` samples from its own generator seeded from ``(seed, i)``. The same call
            reproduces its result; across batch compositions CPU logits may differ in the last bits
            (a GEMM row's bits depend on the number of rows), so batch independence is not promised.
        tokenizer: optional, with ``encode`` / ``decode``: string prompts, text windows, ``result.texts``.
        eos_token_id: a sequence ends after sampling it (the token is kept).
        cache: a :class:`kfuse.kv.PagedKVCache` with ``len(prompts)`` free slots, no open step, and free
            pages for every sequence at its longest (its prompt + ``max_new_tokens − 1`` tokens: a rollback
            frees pages before the re-fed token takes one again, so backtracking needs no more); its
            sequences are added here and freed as they finish. Default: ``model.new_cache`` of that size.
        progress: True (every 32 steps) or N: a one-line progress report on stderr every N steps.
        decode_graphs: run the decode steps (one token per live sequence) through
            ``model.decode_graphs(cache)`` (:class:`kfuse.models.llama.DecodeGraphs`): on a CUDA cache each
            step is one CUDA-graph replay, captured at the first step of each batch size (the batch
            shrinks as sequences end: one capture per size seen); on a CPU cache the same ops run
            eagerly. The tokens are those of the eager steps (bit-identical on the CPU). Off by default:
            captures cost time and memory that short runs do not win back.

    Bans (``ban``): when a window fails, the first rejected token (the one right after the last
    passing checkpoint) is banned after exactly that generated prefix, so a second flag at the same
    checkpoint bans another token; bans survive a reset (they are keyed by the whole prefix).
    ``ban="offending"`` also checks each distinct token of the rejected segment on its own (one more
    ``check`` call per flag) and bans those it flags for the rest of that sequence: the offending word
    itself, wherever it would come back (never so many that fewer tokens stay than one more than the flags a
    sequence can raise: ``(max_backtracks + 1) · (max_resets + 1)`` with ``on_limit="reset"``, else
    ``max_backtracks + 1``; ``max_resets + 1`` in mode ``"reset"``).

    Sampling and checks run on the host (the check needs the tokens): each step copies its logits
    rows to the CPU once. Bad arguments raise ``ValueError`` (``TypeError`` for a model, tokenizer
    or check result of the wrong kind) naming them, before the model runs (except, for a model
    without ``vocab_size``, the vocabulary-size check on the limits, which then needs the first
    logits; and the check's results, known only when it is called).

    Returns:
        :class:`GenerationResult` (invariants in :class:`SequenceStats`).
    """
    t0 = time.perf_counter()
    max_new_tokens = _check_positive_int("max_new_tokens", max_new_tokens)
    check_every = _check_positive_int("check_every", check_every)
    max_backtracks = _check_positive_int("max_backtracks", max_backtracks, 0)
    max_resets = _check_positive_int("max_resets", max_resets, 0)
    window = _check_positive_int("window", 2 * check_every if window is None else window)
    if window < check_every:  # the tokens before the window would be kept unchecked
        raise ValueError(f"{_GEN}: window ({window}) must be >= check_every ({check_every}), so that each check "
                         f"sees every token since the last passing checkpoint")
    if ban not in ("first", "offending"):
        raise ValueError(f"{_GEN}: ban must be 'first' or 'offending'; got {ban!r}")
    if mode not in ("backtrack", "reset", "plain"):
        raise ValueError(f"{_GEN}: mode must be 'backtrack', 'reset' or 'plain'; got {mode!r}")
    if on_limit not in ("reset", "stop"):
        raise ValueError(f"{_GEN}: on_limit must be 'reset' or 'stop'; got {on_limit!r}")
    if mode != "plain" and not callable(check):
        raise ValueError(f"{_GEN}: check must be a callable over windows (mode={mode!r}); got {check!r}")
    if not _is_finite_real(threshold):
        raise ValueError(f"{_GEN}: threshold must be a finite real number (a score >= threshold is a violation); "
                         f"got {threshold!r}")
    if not _is_finite_real(temperature) or temperature < 0:
        raise ValueError(f"{_GEN}: temperature must be a finite float >= 0 (0 = greedy); got {temperature!r}")
    if top_k is not None:
        top_k = _check_positive_int("top_k", top_k)
    if not _is_finite_real(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"{_GEN}: top_p must be in (0, 1]; got {top_p!r}")
    seed = _check_positive_int("seed", seed, 0)
    if not callable(model):
        raise TypeError(f"{_GEN}: model must be callable as model(tokens, seq_ids, cache) (a "
                        f"kfuse.models.LlamaForCausalLM); got {type(model).__name__}")
    model_vocab = getattr(model, "vocab_size", None)
    model_vocab = model_vocab if _is_int(model_vocab) else None
    if eos_token_id is not None:
        eos_token_id = _check_positive_int("eos_token_id", eos_token_id, 0)
        _check_ids("eos_token_id", [eos_token_id], model_vocab)
    if _checks.check_bool(_GEN, "decode_graphs", decode_graphs) and not callable(getattr(model, "decode_graphs", None)):
        raise ValueError(f"{_GEN}: decode_graphs needs a model with decode_graphs() (kfuse.models.LlamaForCausalLM); "
                         f"got {type(model).__name__}")
    every = 32 if progress is True else (0 if progress is False else _check_positive_int("progress", progress))
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"{_GEN}: tokenizer must have decode(ids) -> str (and encode(str) -> ids for string prompts); "
                        f"got {type(tokenizer).__name__}")
    prompt_ids = _prompt_ids(prompts, tokenizer, model_vocab)
    n = len(prompt_ids)
    # The most flags (each banning one token after one prefix) a sequence can raise.
    max_flags = {"plain": 0, "reset": max_resets + 1,
                 "backtrack": (max_backtracks + 1) * (max_resets + 1 if on_limit == "reset" else 1)}[mode]
    if model_vocab is not None:
        _check_flag_room(max_flags, model_vocab)
    # The most tokens each sequence holds in the cache: the last token sampled is never fed.
    longest = [len(p) + max_new_tokens - 1 for p in prompt_ids]
    if cache is None:
        if not callable(getattr(model, "new_cache", None)):
            raise TypeError(f"{_GEN}: model has no new_cache() to make a cache; pass cache (a kfuse.kv.PagedKVCache) "
                            f"or a kfuse.models.LlamaForCausalLM; got {type(model).__name__}")
        page = 16
        pages = _pages(longest, page)
        if pages >= 2**31:  # (the cache's own error named num_pages, which the caller never passed)
            raise ValueError(f"{_GEN}: max_new_tokens={max_new_tokens} needs {pages} cache pages of {page} tokens "
                             "for these prompts; a cache holds fewer than 2^31")
        try:
            cache = model.new_cache(page, num_pages=pages, max_seqs=n)
        except (RuntimeError, MemoryError) as e:  # (torch's allocator error named neither; generator hunt)
            if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
                raise
            raise MemoryError(f"{_GEN}: max_new_tokens={max_new_tokens} needs a cache of {pages} pages of {page} "
                              f"tokens for these prompts (every sequence at its longest), which could not be "
                              f"allocated ({type(e).__name__}: {e}); lower max_new_tokens, or pass cache") from None
    else:
        _check_cache(cache, longest)

    step_graphs = model.decode_graphs(cache, max_len=max(longest)) if decode_graphs else None

    stats = [SequenceStats(prompt_tokens=len(p)) for p in prompt_ids]
    gens = [_seeded_generator(seed, i) for i in range(n)]
    out: list[list[int]] = [[] for _ in range(n)]
    ckpt = [0] * n  # generated tokens up to the last passing checkpoint
    since_reset = [0] * n  # backtracks since the last reset
    bans: list[dict[tuple[int, ...], set[int]]] = [{} for _ in range(n)]
    seq_bans: list[set[int]] = [set() for _ in range(n)]  # ban="offending": banned at every position
    before = set(cache.active_sequences)  # the caller's (see the finally below)
    slots: list[int] | None = None
    live = list(range(n))
    calls = 0
    try:
        slots = [cache.add_sequence() for _ in range(n)]
        logits = model([torch.tensor(p, device="cpu") for p in prompt_ids], slots, cache)
        calls += 1
        rows = _checked_rows(torch.stack([x[-1] for x in logits]).float().cpu(), n, None, 0)  # one transfer per step
        del logits  # [prompt_len, vocab] per prompt (500 MiB for 4096 tokens of a 32k vocabulary): not kept
        vocab = rows.shape[1]
        if model_vocab is None:  # known only now
            _check_flag_room(max_flags, vocab)
        for i in range(n):
            st = stats[i]
            st.forward_passes, st.tokens_computed = 1, st.prompt_tokens
        step = 0
        while live:
            step += 1
            ended: list[int] = []
            due: list[int] = []
            toks = _sample(rows, [bans[i].get(tuple(out[i]), set()) | seq_bans[i] for i in live], float(temperature),
                           top_k, float(top_p), [gens[i] for i in live], live)
            for i, t in zip(live, toks, strict=True):
                out[i].append(t)
                stats[i].tokens_sampled += 1
                done = t == eos_token_id or len(out[i]) == max_new_tokens
                if done:
                    stats[i].finish_reason = "eos" if t == eos_token_id else "length"
                    ended.append(i)
                if mode != "plain" and (len(out[i]) - ckpt[i] >= check_every or (done and len(out[i]) > ckpt[i])):
                    due.append(i)
            flagged = _run_check(check, [out[i][-window:] for i in due], tokenizer, threshold) if due else []
            rollback_ids, rollback_lens, refeed = [], [], {}
            for i, bad in zip(due, flagged, strict=True):
                stats[i].checks += 1
                if not bad:
                    ckpt[i] = len(out[i])
                    continue
                stats[i].flags += 1
                c = ckpt[i]
                bans[i].setdefault(tuple(out[i][:c]), set()).add(out[i][c])
                if ban == "offending":
                    seq_bans[i] |= _offending(check, out[i][c:], tokenizer, threshold, vocab - max_flags - 1 -
                                              len(seq_bans[i]))
                if mode == "backtrack" and since_reset[i] < max_backtracks:
                    since_reset[i] += 1
                    stats[i].backtracks += 1
                    keep = c
                elif (mode == "reset" or on_limit == "reset") and stats[i].resets < max_resets:
                    since_reset[i] = 0
                    stats[i].resets += 1
                    keep = ckpt[i] = 0
                else:  # out of backtracks and resets: end at the last passing checkpoint
                    stats[i].finish_reason = "limit"
                    keep = c
                stats[i].tokens_discarded += len(out[i]) - keep
                del out[i][keep:]
                if stats[i].finish_reason == "limit":
                    if i not in ended:
                        ended.append(i)
                    continue
                if i in ended:  # the flag overrides EOS / length: the sequence goes on
                    ended.remove(i)
                    stats[i].finish_reason = ""
                # Revert to the checkpoint by re-feeding its last token (see the module docstring).
                ctx_len = stats[i].prompt_tokens + keep
                rollback_ids.append(slots[i])
                rollback_lens.append(ctx_len - 1)
                refeed[i] = out[i][keep - 1] if keep else prompt_ids[i][-1]
            for i in ended:
                cache.free(slots[i])
            live = [i for i in live if i not in ended]
            if rollback_ids:
                cache.rollback(rollback_ids, rollback_lens)
            if every and step % every == 0:
                _report_progress(step, live, n, stats, t0)
            if not live:
                break
            feed = [refeed[i] if i in refeed else out[i][-1] for i in live]
            fed = torch.tensor(feed, device="cpu")
            if step_graphs is None:
                rows = torch.cat(model(list(fed[:, None]), [slots[i] for i in live], cache))
            else:
                rows = step_graphs(fed, [slots[i] for i in live])
            rows = _checked_rows(rows.float().cpu(), len(live), vocab, step)
            calls += 1
            for i in live:
                stats[i].forward_passes += 1
                stats[i].tokens_computed += 1
    finally:
        # On an error, give the caller's cache its slots back (finished sequences are already freed).
        cache.abort_step()  # a model that raised mid-step may have left it open
        # Before slots was stored, by the cache's record: an interrupt raised as add_sequence returned claimed a
        # slot slots never held (the caller's cache then refused the next call: process hunt, 2026-12-07); no
        # check has run yet, so every sequence added since is this call's. After, this call's own only: a check
        # may keep a scratch sequence of its own in the cache (re-entrancy hunt: it was freed, and the next call
        # gave its slot to a prompt, which the check then overwrote).
        active = set(cache.active_sequences)
        mine = active - before if slots is None else {slots[i] for i in live} & active
        for s in sorted(mine):
            cache.free(s)
    for i in range(n):
        stats[i].tokens_kept = len(out[i])
    # (Copies: a decode that edits its argument, e.g. strips an end token in place, changed the result's tokens.)
    texts = [tokenizer.decode(list(o)) for o in out] if tokenizer is not None else None
    return GenerationResult(out, texts, stats, calls, time.perf_counter() - t0)


def _offending(check: Check, segment: list[int], tokenizer: Any, threshold: float, room: int) -> set[int]:
    """The distinct tokens of ``segment`` that ``check`` flags on their own (at most ``room`` of them)."""
    singles = sorted(set(segment))
    if not singles or room <= 0:  # no room left for sequence-wide bans: none (the check need not run)
        return set()
    flagged = _run_check(check, [[t] for t in singles], tokenizer, threshold)
    return set([t for t, bad in zip(singles, flagged, strict=True) if bad][:room])


def _checked_rows(rows: Tensor, n: int, vocab: int | None, step: int) -> Tensor:
    """The model's next-token logits ``rows [n, vocab]`` (float32, CPU) of one step, or an error that
    says what is wrong: with NaN, greedy decoding took the NaN as the best token and sampling the
    first id, silently; a narrower row sampled from part of the vocabulary (exceptions hunt)."""
    if rows.ndim != 2 or rows.shape[0] != n or (vocab is not None and rows.shape[1] != vocab):
        want = f"[{n}, {vocab if vocab is not None else 'vocab'}]"
        raise ValueError(f"{_GEN}: the model's last-position logits at step {step} must be {want} (one row per "
                         f"sequence fed); got {list(rows.shape)}")
    # One reduction over the rows per step (no mask unless it is NaN: −inf logits sum to −inf, and
    # only +inf beside −inf makes a NaN sum without a NaN logit).
    bad = torch.isnan(rows).any(1) if torch.isnan(rows.sum()) else None
    if bad is not None and bad.any():
        raise ValueError(f"{_GEN}: the model returned NaN logits at step {step} for rows "
                         f"{torch.nonzero(bad).flatten().tolist()} of the batch")
    return rows


def _run_check(check: Check, windows: list[list[int]], tokenizer: Any, threshold: float) -> list[bool]:
    """``check`` over the windows (decoded when a tokenizer is given), as one bool per window."""
    # Copies: a check may consume or edit what it is given (a queue it pops: its count was then read after
    # the call; re-entrancy hunt, 2026-12-07).
    arg = [tokenizer.decode(list(w)) for w in windows] if tokenizer is not None else [list(w) for w in windows]
    res = check(arg)
    if isinstance(res, (Tensor, np.ndarray)):
        res = res.tolist()  # a 0-d array gives a scalar, refused below
    must = "check must return one bool (True = violation) or real score (>= threshold) per window"
    # (A mapping or set is iterable, but its order or keys are not per-window results: a dict's keys were taken as
    # the scores; generator hunt, 2026-12-07.)
    if isinstance(res, (str, bytes, Mapping, AbstractSet)) or not isinstance(res, Iterable):
        raise TypeError(f"{_GEN}: {must}, as a list; got {type(res).__name__}")
    res = list(itertools.islice(res, len(windows) + 1))  # an endless iterator must not hang generate
    if len(res) != len(windows):
        got = f"{len(res)}" if len(res) <= len(windows) else f"more than {len(windows)}"
        raise ValueError(f"{_GEN}: {must}; it returned {got} results for {len(windows)} windows")
    out = []
    for j, r in enumerate(res):
        if isinstance(r, (bool, np.bool_)):
            out.append(bool(r))
        elif not isinstance(r, numbers.Real):
            raise TypeError(f"{_GEN}: {must}; got {r!r} ({type(r).__name__}) for window {j}")
        elif math.isnan(r):  # nan >= threshold is False: the window would pass unchecked
            raise ValueError(f"{_GEN}: {must}; got NaN for window {j}")
        else:
            out.append(float(r) >= threshold)
    return out


def _report_progress(step: int, live: list[int], n: int, stats: list[SequenceStats], t0: float) -> None:
    kept = sum(s.tokens_sampled - s.tokens_discarded for s in stats)
    dt = time.perf_counter() - t0
    print(f"kfuse.backtrack: step {step}, {len(live)}/{n} live, {kept} tokens kept, "
          f"{sum(s.tokens_discarded for s in stats)} discarded, {sum(s.backtracks for s in stats)} backtracks, "
          f"{sum(s.resets for s in stats)} resets, {dt:.1f} s ({kept / max(dt, 1e-9):.1f} kept tok/s)",
          file=sys.stderr, flush=True)
