"""Tests of kfuse.backtrack.generate on a tiny random transformers Llama (float32, CPU) run by
kfuse.models.LlamaForCausalLM on the paged cache.

Exact token comparisons between runs rely on equal call shapes: generate feeds one token per live
sequence per call whether or not a sequence backtracked (it re-feeds the checkpoint's token), so a
flagged sequence leaves the other sequences' GEMM rows, and so their greedy tokens, bit-identical.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import warnings
import weakref

import numpy as np
import pytest
import torch
from interrupts import RaisesAfter

transformers = pytest.importorskip("transformers")

from kfuse.backtrack import GenerationResult, ProfanityCheck, WordListCheck, generate  # noqa: E402
from kfuse.kv import PagedKVCache  # noqa: E402
from kfuse.models import LlamaForCausalLM  # noqa: E402

VOCAB = 101
CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
           intermediate_size=128, max_position_embeddings=64, initializer_range=0.2)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12]]
N = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The GEMMs are tiny (64 wide): with other work on the cores, OpenMP's barriers between threads made
    # a generate() call 140x slower on 2 threads than on 1 (measured: 4.2 s vs 0.03 s).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM.from_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval())


@pytest.fixture(scope="module")
def plain(model) -> GenerationResult:
    return generate(model, PROMPTS, max_new_tokens=N, mode="plain")


def assert_invariants(res: GenerationResult, mode: str = "backtrack") -> None:
    """The invariants SequenceStats documents, per sequence and in the totals."""
    for toks, s in zip(res.tokens, res.stats, strict=True):
        assert s.tokens_kept == len(toks)
        assert s.tokens_sampled == s.tokens_kept + s.tokens_discarded
        assert s.forward_passes == s.tokens_sampled
        assert s.tokens_computed == s.prompt_tokens + s.tokens_sampled - 1
        assert s.flags == s.backtracks + s.resets + (s.finish_reason == "limit")
        assert s.finish_reason in ("length", "eos", "limit")
        if mode == "plain":
            assert s.backtracks == s.resets == s.tokens_discarded == s.checks == 0
        if mode == "reset":
            assert s.backtracks == 0
    assert res.totals["tokens_kept"] == sum(map(len, res.tokens))
    assert res.totals["tokens_computed"] == sum(s.tokens_computed for s in res.stats)
    # one call per step: the prefill, then as many calls as the longest-lived sequence took steps
    assert res.forward_passes == max(s.forward_passes for s in res.stats)
    assert res.wall_time > 0


def contains(tokens: list[int], word: list[int]) -> bool:
    return WordListCheck([word])([tokens])[0]


def greedy_loop(model: LlamaForCausalLM) -> list[list[int]]:
    """N greedy tokens per prompt of PROMPTS by a plain loop over the model: the prompts in one call, then
    one token per sequence per call (generate()'s call shapes)."""
    cache = model.new_cache(page_size=4, num_pages=32, max_seqs=3)
    ids = [cache.add_sequence() for _ in PROMPTS]
    last = [x[-1] for x in model([torch.tensor(p) for p in PROMPTS], ids, cache)]
    out: list[list[int]] = [[] for _ in PROMPTS]
    for step in range(N):
        nxt = [int(x.argmax()) for x in last]
        for e, t in zip(out, nxt, strict=True):
            e.append(t)
        if step < N - 1:
            last = [x[-1] for x in model([torch.tensor([t]) for t in nxt], ids, cache)]
    return out


def test_plain_equals_a_greedy_loop_and_sampling_is_reproducible(model, plain):
    expected = greedy_loop(model)
    assert plain.tokens == expected
    assert_invariants(plain, "plain")
    assert [s.finish_reason for s in plain.stats] == ["length"] * 3

    # top_k=1 and a tiny top_p leave only the most likely token: greedy, whatever the temperature.
    for cut in ({"top_k": 1}, {"top_p": 1e-6}):
        assert generate(model, PROMPTS, max_new_tokens=N, mode="plain", temperature=2.0, **cut).tokens == expected
    kw = dict(max_new_tokens=N, mode="plain", temperature=1.0, top_k=20, top_p=0.9)
    a, b = (generate(model, PROMPTS, seed=3, **kw) for _ in range(2))
    assert a.tokens == b.tokens
    assert generate(model, PROMPTS, seed=4, **kw).tokens != a.tokens

    # EOS ends a sequence (the token is kept) and frees its slot; the caller's sequences are untouched.
    eos = plain.tokens[0][5]
    cache = model.new_cache(page_size=4, num_pages=32, max_seqs=4)
    mine = cache.add_sequence()
    model([torch.tensor([3, 4])], [mine], cache)
    res = generate(model, PROMPTS, max_new_tokens=N, mode="plain", eos_token_id=eos, cache=cache)
    assert res.tokens[0] == plain.tokens[0][:plain.tokens[0].index(eos) + 1]
    assert res.stats[0].finish_reason == "eos"
    assert_invariants(res, "plain")
    assert cache.active_sequences == [mine] and cache.length(mine) == 2


def test_numpy_integers_and_bool_flags(model, plain):
    """numpy and 0-d tensor integers were refused as "must be an int" (error-message hunt); they are taken as
    their ints. A string decode_graphs ('False') was taken by its truth; it is refused, named."""
    got = generate(model, PROMPTS, max_new_tokens=np.int64(N), mode="plain", seed=torch.tensor(0), top_k=np.int64(50))
    _same_run(got, plain)
    with pytest.raises(TypeError, match="decode_graphs must be a bool; got str"):
        generate(model, PROMPTS, max_new_tokens=N, mode="plain", decode_graphs="False")


def _same_run(a: GenerationResult, b: GenerationResult) -> None:
    assert a.tokens == b.tokens and a.forward_passes == b.forward_passes
    assert [vars(x) for x in a.stats] == [vars(y) for y in b.stats]


def test_generate_on_the_cpu_under_another_default_device(model, plain):
    """Under torch.set_default_device("cuda") (here "meta", which every machine has) a CPU model's run made
    its tokens and positions on the default device and failed (bug hunt): every host tensor names the CPU, and
    the run (plain, and reverting with a check) gives the same tokens as outside it."""
    bad = [plain.tokens[1][9]]
    with_check = dict(max_new_tokens=N, check=WordListCheck([bad]), check_every=4, window=4)
    want = generate(model, PROMPTS, **with_check)
    sampled = dict(max_new_tokens=N, mode="plain", temperature=1.0, seed=5)
    want_sampled = generate(model, PROMPTS, **sampled)
    with torch.device("meta"):
        got = [generate(model, PROMPTS, max_new_tokens=N, mode="plain"), generate(model, PROMPTS, **with_check),
               generate(model, PROMPTS, **sampled)]  # (sampling drew its uniforms on meta: globals hunt)
    _same_run(got[0], plain)
    _same_run(got[1], want)
    _same_run(got[2], want_sampled)
    assert want.totals["backtracks"] + want.totals["resets"] >= 1


def test_decode_graphs_give_the_eager_steps_tokens(model, plain):
    """generate(decode_graphs=True) steps through model.decode_graphs (on the CPU the same ops, eagerly):
    greedy, sampled with backtracks and EOS (the batch shrinks), the same tokens and statistics. A
    model without decode_graphs is refused by name."""
    _same_run(generate(model, PROMPTS, max_new_tokens=N, mode="plain", decode_graphs=True), plain)
    kw = dict(max_new_tokens=N, check=WordListCheck([[t] for t in range(0, VOCAB, 9)]), check_every=4,
              temperature=1.0, seed=5, eos_token_id=plain.tokens[0][5])
    eager, graphed = (generate(model, PROMPTS, decode_graphs=g, **kw) for g in (False, True))
    assert eager.totals["backtracks"] > 0 and "eos" in [s.finish_reason for s in eager.stats]
    _same_run(eager, graphed)

    class Bare:
        def __call__(self, *args):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="decode_graphs needs a model with decode_graphs.*Bare"):
        generate(Bare(), PROMPTS, max_new_tokens=N, mode="plain", decode_graphs=True)


def test_backtrack_reverts_to_the_last_passing_checkpoint_and_bans(model, plain):
    # Flag a token that sequence 1 generates greedily in its third block of 4 and nowhere before.
    ref = plain.tokens[1]
    j = next(j for j in range(8, 12) if ref[j] not in ref[:8])
    bad = [ref[j]]
    seen: list[list[int]] = []

    def check(windows):
        seen.extend(windows)
        return WordListCheck([bad])(windows)

    res = generate(model, PROMPTS, max_new_tokens=N, check=check, check_every=4, window=4)
    assert_invariants(res)
    s = res.stats[1]
    assert s.backtracks >= 1 and s.resets == 0 and s.finish_reason == "length"
    assert res.tokens[1][:8] == ref[:8]  # reverted to the checkpoint at 8 generated tokens, not to the prompt
    assert res.tokens[1][8] != ref[8]  # the first rejected token is banned after that prefix
    assert ref[8:12] in seen  # the window that failed
    assert not contains(res.tokens[1], bad) and len(res.tokens[1]) == N
    # Other sequences: never flagged, tokens equal to the run without flags.
    for i in (0, 2):
        assert res.tokens[i] == plain.tokens[i]
        assert res.stats[i].flags == res.stats[i].tokens_discarded == 0

    # The reset baseline on the same flags keeps the same tokens (greedy, same bans) at a higher cost.
    rst = generate(model, PROMPTS, max_new_tokens=N, check=WordListCheck([bad]), check_every=4, window=4,
                   mode="reset", max_resets=8)
    assert_invariants(rst, "reset")
    assert not contains(rst.tokens[1], bad)
    assert rst.stats[1].resets == s.backtracks
    assert rst.stats[1].tokens_discarded > s.tokens_discarded
    assert rst.stats[1].tokens_computed > s.tokens_computed
    assert rst.tokens[1] == res.tokens[1]

    # Sampling with backtracking reproduces itself with the same seed.
    kw = dict(max_new_tokens=N, check=WordListCheck([bad]), check_every=4, temperature=1.0, top_p=0.95, seed=7)
    a, b = (generate(model, PROMPTS, **kw) for _ in range(2))
    assert a.tokens == b.tokens and a.stats == b.stats and not any(contains(t, bad) for t in a.tokens)
    assert_invariants(a)

    # A flag overrides EOS: the flagged token is also the EOS token, the sequence reverts and goes on.
    eos = generate(model, PROMPTS, max_new_tokens=N, check=WordListCheck([bad]), check_every=4, window=4,
                   eos_token_id=bad[0])
    assert_invariants(eos)
    assert eos.tokens[1][:8] == ref[:8] and not contains(eos.tokens[1], bad)
    assert eos.stats[1].backtracks >= 1 and eos.stats[1].finish_reason == "length" and len(eos.tokens[1]) == N


def test_limits_fall_back_to_reset_then_stop(model):
    def always(windows):
        return [1.0] * len(windows)  # scores: violation when >= threshold

    windows: list[list[int]] = []
    kw = dict(max_new_tokens=N, check_every=4, max_backtracks=2)
    stop = generate(model, PROMPTS[:1], on_limit="stop", check=lambda w: windows.extend(w) or always(w), **kw)
    assert_invariants(stop)
    s = stop.stats[0]
    assert stop.tokens == [[]] and (s.backtracks, s.resets, s.finish_reason) == (2, 0, "limit")
    assert s.tokens_discarded == 3 * 4
    # Three flags at the same checkpoint (the prompt): each banned the first token of its window, so the
    # three windows start with three different tokens.
    assert len(windows) == 3 and len({w[0] for w in windows}) == 3
    kw["check"] = always
    reset = generate(model, PROMPTS[:2], on_limit="reset", max_resets=1, **kw)
    assert_invariants(reset)
    assert all((s.backtracks, s.resets, s.finish_reason) == (4, 1, "limit") for s in reset.stats)
    only_reset = generate(model, PROMPTS[:2], mode="reset", max_resets=2, **kw)
    assert_invariants(only_reset, "reset")
    assert all((s.backtracks, s.resets, s.finish_reason) == (0, 2, "limit") for s in only_reset.stats)
    # Below the threshold nothing is flagged.
    calm = generate(model, PROMPTS[:2], threshold=1.5, **kw)
    assert calm.totals["flags"] == 0 and calm.totals["checks"] == 2 * N // 4


def test_every_kept_token_is_inside_a_checked_window(model):
    """A window shorter than check_every would leave the tokens before it unchecked (window=2,
    check_every=8 kept flagged tokens with no backtrack): refused. With window == check_every, every
    kept token was checked: none of the flagged ids survives, whether the run ends on a checkpoint or not."""
    flagged = list(range(0, VOCAB, 9))
    check = WordListCheck([[t] for t in flagged])
    with pytest.raises(ValueError, match=r"generate: window \(2\) must be >= check_every \(8\)"):
        generate(model, PROMPTS, max_new_tokens=N, check=check, window=2, check_every=8)
    for every, new, seed in ((4, N, 5), (8, N, 6), (5, 13, 7)):
        res = generate(model, PROMPTS, max_new_tokens=new, check=check, check_every=every, window=every,
                       temperature=1.0, seed=seed, max_backtracks=8)
        assert_invariants(res)
        assert res.totals["backtracks"] > 0
        assert not any(set(t) & set(flagged) for t in res.tokens), res.tokens


class WordTokenizer:
    """Token i is the word WORDS[i]: a tokenizer for text checks without a download."""

    def __init__(self, words: dict[int, str]) -> None:
        self.words = words

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words.get(i, f"w{i}") for i in ids)


def test_text_checks_and_profanity_check(model, plain, capsys):
    texts = [" ".join(f"w{t}" for t in p) for p in PROMPTS]  # the same batch, so sequence 1 matches `plain`
    ref = plain.tokens[1]
    j = next(j for j in range(8, 12) if ref[j] not in ref[:8])
    tok = WordTokenizer({ref[j]: "damn"})
    res = generate(model, texts, max_new_tokens=N, check=WordListCheck(["DAMN"]), check_every=4, window=4,
                   tokenizer=tok, progress=4)
    assert res.tokens[1][:8] == ref[:8] and ref[j] not in res.tokens[1] and res.stats[1].backtracks >= 1
    assert res.texts == [tok.decode(t) for t in res.tokens]
    assert "kfuse.backtrack: step 4," in capsys.readouterr().err

    pytest.importorskip("profanity_check", reason="alt-profanity-check is not installed (requirements-dev.txt)")
    check = ProfanityCheck(threshold=0.5)
    assert check(["you are a fucking idiot", "have a nice day"]) == [True, False]
    tok = WordTokenizer({ref[j]: "fucking idiot"})
    res = generate(model, texts, max_new_tokens=N, check=check, check_every=4, window=4, tokenizer=tok)
    assert res.stats[1].backtracks >= 1 and not any("fucking" in t for t in res.texts)
    with pytest.raises(TypeError, match="text"):
        check.scores([[1, 2]])


def test_profanity_check_threshold_sets_what_is_flagged():
    """A text the classifier scores between two thresholds is flagged by the lower one only."""
    pytest.importorskip("profanity_check", reason="alt-profanity-check is not installed (requirements-dev.txt)")
    low, high = ProfanityCheck(threshold=0.9), ProfanityCheck(threshold=0.99)
    text = ["damn it"]
    assert 0.9 <= low.scores(text)[0] < 0.99
    assert low(text) == [True] and high(text) == [False]


def test_malformed_model_or_check_output_raises_naming_it(model):
    """A model returning NaN logits made greedy decoding pick the NaN (sampling the first id) and
    narrower logits sampled from part of the vocabulary, silently; a check returning an endless
    iterator hung (exceptions hunt, 2026-12-04). Each is a clear error; the caller's cache is left
    with no sequence of the call."""
    class Spoiled:
        vocab_size, new_cache = model.vocab_size, model.new_cache

        def __init__(self, spoil, at):
            self.spoil, self.at, self.calls = spoil, at, 0

        def __call__(self, tokens, seq_ids, cache):
            out = model(tokens, seq_ids, cache)
            self.calls += 1
            return [self.spoil(x) for x in out] if self.calls == self.at else out

    def nan_row(x):
        return x.clone().index_fill_(-1, torch.tensor([3]), float("nan"))

    for spoil, at, match in ((nan_row, 1, "NaN logits at step 0"), (nan_row, 3, "NaN logits at step 2"),
                             (lambda x: x[..., :-1], 2, r"logits at step 1 must be \[2, 101\]")):
        cache = model.new_cache(num_pages=16, max_seqs=4)
        for temperature in (0.0, 1.0):
            with pytest.raises(ValueError, match="kfuse.backtrack.generate: .*" + match):
                generate(Spoiled(spoil, at), PROMPTS[:2], max_new_tokens=4, mode="plain", cache=cache,
                         temperature=temperature)
            assert cache.stats()["sequences"] == 0

    def endless(windows):
        return itertools.repeat(0.0)

    with pytest.raises(ValueError, match="returned more than 2 results for 2 windows"):
        generate(model, PROMPTS[:2], max_new_tokens=4, check=endless, check_every=2, window=2)


def test_prompt_logits_are_not_kept_while_decoding(model):
    """generate() kept the prefill's [prompt_len, vocab] logits of every prompt alive for the whole
    decode loop (500 MiB for a 4096-token prompt at a 32k vocabulary; memory bug hunt, 2026-12-04):
    once the first tokens are sampled, none of them may be referenced."""
    prefill: list[weakref.ref] = []
    alive_at_checks: list[int] = []

    class Recording:
        vocab_size, new_cache = model.vocab_size, model.new_cache

        def __call__(self, tokens, seq_ids, cache):
            out = model(tokens, seq_ids, cache)
            if not prefill:
                prefill.extend(weakref.ref(x) for x in out)
            return out

    def check(windows):
        alive_at_checks.append(sum(r() is not None for r in prefill))
        return [0.0] * len(windows)

    generate(Recording(), PROMPTS, max_new_tokens=4, check=check, check_every=2, window=2)
    assert len(prefill) == len(PROMPTS) and alive_at_checks and set(alive_at_checks) == {0}


class NotCalled:
    """``model``'s vocabulary and new_cache, but calling it fails: errors raised through it came before
    any model call."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.vocab_size, self.new_cache = model.vocab_size, model.new_cache

    def __call__(self, *args):
        raise AssertionError("the model ran before the argument error")


def test_bad_arguments_raise_naming_them(model):
    ok = dict(max_new_tokens=4, check=WordListCheck([[0]]))
    cases = [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2**40}, "max_new_tokens=1099511627776 needs"),
        ({"check_every": 0}, "check_every"),
        ({"window": 0}, "window"),
        ({"max_backtracks": -1}, "max_backtracks"),
        ({"max_resets": 1.5}, "max_resets"),
        ({"mode": "undo"}, "mode"),
        ({"on_limit": "retry"}, "on_limit"),
        ({"check": None}, "check"),
        ({"window": 2, "check_every": 4}, "window"),
        ({"threshold": "x"}, "threshold"),
        ({"threshold": None}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 10**400}, "temperature"),  # a Real beyond float's range (was a bare OverflowError)
        ({"top_p": 10**400}, "top_p"),
        ({"threshold": 10**400}, "threshold"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"eos_token_id": -2}, "eos_token_id"),
        ({"eos_token_id": 10**6}, r"eos_token_id must hold token ids in \[0, vocab_size=101\)"),
        ({"progress": 0}, "progress"),
        ({"cache": object()}, "cache"),
        ({"cache": model.new_cache(num_pages=4, max_seqs=1)}, "free sequence slots"),
        ({"max_backtracks": 100}, "vocabulary"),
        ({"mode": "reset", "max_resets": 100}, "vocabulary"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match="kfuse.backtrack.generate: .*" + match):
            generate(NotCalled(model), PROMPTS[:2], **{**ok, **kw})
    for prompts, match in (([], "prompts"), ([[]], r"prompts\[0\]"), (["w1"], "tokenizer"),
                           ([[1], [1.5]], r"prompts\[1\]"), ([[1], [5, VOCAB]], r"prompts\[1\].*vocab_size=101.*101"),
                           ([[1], [-1]], r"prompts\[1\]"), ([[1], 7], r"prompts\[1\] must be a list of int"),
                           (np.array(PROMPTS[0]), "one prompt per sequence")):
        with pytest.raises(ValueError, match=match):
            generate(NotCalled(model), prompts, **ok)
    for kw, match in (({"model": "x"}, "model must be callable"), ({"model": lambda *a: None}, "new_cache"),
                      ({"tokenizer": object()}, "tokenizer must have decode"),
                      ({"prompts": ["w1"], "tokenizer": type("DecodeOnly", (), {"decode": str})()},
                       r"tokenizer has no encode\(\) for the string prompts\[0\]")):
        with pytest.raises(TypeError, match=match):
            generate(**{"model": NotCalled(model), "prompts": PROMPTS[:2], **ok, **kw})
    with pytest.raises(ValueError, match="threshold"):
        ProfanityCheck(threshold=2.0)
    # A cache the allocator cannot give (max_new_tokens=10**9 on a CPU: torch's bare allocator error; generator hunt)
    no_memory = NotCalled(model)

    def refuse(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 64000001024 bytes")

    no_memory.new_cache = refuse
    with pytest.raises(MemoryError, match=r"max_new_tokens=4 needs a cache of \d+ pages of 16 tokens"):
        generate(no_memory, PROMPTS[:2], **ok)

    class NoVocab:  # a model without vocab_size: the limits' vocabulary check waits for the first logits
        def __init__(self, model: LlamaForCausalLM) -> None:
            self.model, self.new_cache = model, model.new_cache

        def __call__(self, *args):
            return self.model(*args)

    with pytest.raises(ValueError, match="generate: max_backtracks / max_resets allow 202 bans.*only 101 tokens"):
        generate(NoVocab(model), PROMPTS[:2], **{**ok, "max_backtracks": 100})


def test_numpy_prompts_are_accepted(model, plain):
    for prompts in ([np.array(p) for p in PROMPTS], [[np.int64(t) for t in p] for p in PROMPTS],
                    [torch.tensor(p) for p in PROMPTS]):
        assert generate(model, prompts, max_new_tokens=N, mode="plain").tokens == plain.tokens


def test_check_results_are_validated(model):
    """The check returns one bool or real score per window; anything else raises naming check (a NaN
    score would pass every window; a mapping or set is no per-window sequence). numpy and torch arrays of bools
    or scores are accepted."""
    kw = dict(max_new_tokens=4, check_every=2)
    for result, err, match in ((lambda w: None, TypeError, "got NoneType"),
                               (lambda w: ["bad"] * len(w), TypeError, "got 'bad'"),
                               (lambda w: [None] * len(w), TypeError, "got None"),
                               (lambda w: np.array(True), TypeError, "got bool"),
                               (lambda w: [], ValueError, "returned 0 results for 1 windows"),
                               (lambda w: [float("nan")] * len(w), ValueError, "got NaN for window 0"),
                               # (a dict's keys were taken as the scores: generator hunt)
                               (lambda w: dict.fromkeys(range(len(w)), False), TypeError, "got dict"),
                               (lambda w: {False}, TypeError, "got set")):
        with pytest.raises(err, match="generate: check must return one bool .* per window.*" + match):
            generate(model, PROMPTS[:1], check=result, **kw)
    for result in (lambda w: np.zeros(len(w), dtype=bool), lambda w: torch.zeros(len(w)),
                   lambda w: [np.float32(0.1)] * len(w)):
        res = generate(model, PROMPTS[:1], check=result, **kw)
        assert res.totals["checks"] == 2 and res.totals["flags"] == 0


def test_caller_cache_is_checked_up_front(model):
    """A caller's cache must hold every sequence at its longest (prompt + max_new_tokens - 1 tokens; a
    backtracking run needs no more): exactly that many pages work, one fewer is refused before the model
    runs, naming cache; so is a cache whose sequences cannot grow that long, or one with an open step."""
    kw = dict(max_new_tokens=N, check=WordListCheck([[t] for t in range(0, VOCAB, 9)]), check_every=4,
              temperature=1.0, seed=5)
    pages = sum(-(-(len(p) + N - 1) // 4) for p in PROMPTS)
    res = generate(model, PROMPTS, cache=model.new_cache(page_size=4, num_pages=pages, max_seqs=3), **kw)
    assert_invariants(res)
    assert res.totals["backtracks"] > 0 and all(len(t) == N for t in res.tokens)
    for cache, match in ((model.new_cache(page_size=4, num_pages=pages - 1, max_seqs=3),
                          f"cache has {pages - 1} free pages of 4 tokens; the prompts may need {pages}"),
                         (model.new_cache(page_size=4, num_pages=pages, max_seqs=3, max_pages_per_seq=4),
                          "cache holds at most 16 tokens per sequence; the longest .* is 20")):
        with pytest.raises(ValueError, match="kfuse.backtrack.generate: " + match):
            generate(NotCalled(model), PROMPTS, cache=cache, **kw)
        assert cache.active_sequences == []
    cache = model.new_cache(page_size=4, num_pages=64, max_seqs=4)
    mine = cache.add_sequence()
    kv = torch.zeros(1, model.num_kv_heads, model.head_dim)
    cache.append(0, [mine], kv, kv)  # the caller's open step: not generate's to abort
    with pytest.raises(ValueError, match="generate: cache: a step is open"):
        generate(NotCalled(model), PROMPTS, cache=cache, **kw)
    cache.append(1, [mine], kv, kv)
    cache.advance([mine])
    assert cache.active_sequences == [mine] and cache.length(mine) == 1


def test_an_interrupt_as_a_slot_is_claimed_leaves_the_callers_cache_free(model, monkeypatch):
    """An interrupt raised as the cache's add_sequence returned (before generate had the id, and before its
    cleanup's try): the slot stayed claimed in the caller's cache, which refused the next call (process hunt,
    2026-12-07). generate now frees every sequence the cache holds that the caller's did not."""
    cache = model.new_cache(page_size=4, num_pages=64, max_seqs=3)
    mine = cache.add_sequence()

    def interrupted_at(k: int):  # add_sequence whose k-th call raises as it returns
        calls = iter(range(k + 1))
        claim = RaisesAfter(cache, "add_sequence").add_sequence
        return lambda: claim() if next(calls) == k else PagedKVCache.add_sequence(cache)

    for k in range(2):  # as the first slot is claimed, then the second
        monkeypatch.setattr(cache, "add_sequence", interrupted_at(k))
        with pytest.raises(KeyboardInterrupt):
            generate(model, PROMPTS[:2], max_new_tokens=2, mode="plain", cache=cache)
        monkeypatch.undo()
        assert cache.active_sequences == [mine]
    assert len(generate(model, PROMPTS[:2], max_new_tokens=2, mode="plain", cache=cache).tokens) == 2


def test_checks_and_tokenizers_that_keep_state_in_the_cache_or_edit_their_arguments(model, plain):
    """A check may keep a scratch sequence of its own in the caller's cache: generate freed every sequence it did
    not find there, the scratch one too, and the next call gave that slot to a prompt, which the check then
    overwrote (a never-flagging check changed the tokens). A check that consumes its list of windows was refused
    (the count was read after the call); a decode that edits its argument changed the result's tokens
    (re-entrancy hunt, 2026-12-07)."""
    cache = model.new_cache(page_size=4, num_pages=96, max_seqs=6)

    class Scratch:  # scores each window by running the model on a sequence of its own, kept between calls
        seq = None

        def __call__(self, windows):
            if self.seq is None:
                self.seq = cache.add_sequence()
            for w in windows:
                cache.reset([self.seq])
                model([torch.tensor(w)], [self.seq], cache)
            return [False] * len(windows)

    check = Scratch()
    for _ in range(2):
        res = generate(model, PROMPTS, max_new_tokens=N, check=check, check_every=4, cache=cache)
        assert res.tokens == plain.tokens and cache.active_sequences == [check.seq]

    def queue(windows):  # pops what it was given
        out = []
        while windows:
            out.append(False)
            windows.pop(0)
        return out

    assert generate(model, PROMPTS, max_new_tokens=N, check=queue, check_every=4).tokens == plain.tokens

    class Stripping:  # drops a trailing token in place
        def decode(self, ids):
            ids.pop()
            return " ".join(map(str, ids))

    res = generate(model, PROMPTS, max_new_tokens=N, mode="plain", tokenizer=Stripping())
    assert res.tokens == plain.tokens
    assert all(st.tokens_kept == len(t) for st, t in zip(res.stats, res.tokens, strict=True))


def test_word_list_check_validates_words():
    for words in ("damn", 5, [5, 7], [["a"]], [[1.5]], [None]):
        with pytest.raises(TypeError, match=r"WordListCheck: words(\[0\])? must be a (list of )?string"):
            WordListCheck(words)
    for words in ([], [[]], [""]):
        with pytest.raises(ValueError, match="WordListCheck: words must not"):
            WordListCheck(words)
    check = WordListCheck([np.array([3, 4]), (np.int64(7),), "damn"])
    assert check([[1, 3, 4], [3, 5, 4], [7]]) == [True, False, True] and check(["Damn!"]) == [True]


def test_profanity_check_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install alt-profanity-check"):
        ProfanityCheck()


# --------------------------------------------------------------------------- the demo and its baselines


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()


def test_dynamic_cache_baseline_generates_the_same_and_recomputes(hf_model):
    """kfuse.demos.backtrack.DynamicCacheModel through the same generate(): the same tokens as kfuse's
    model (float32), plain and backtracking; its cost counts every padded position of the rectangle."""
    from kfuse.demos.backtrack import DynamicCacheModel  # noqa: PLC0415

    model, dc = LlamaForCausalLM.from_hf(hf_model), DynamicCacheModel(hf_model)
    a = generate(model, PROMPTS, max_new_tokens=N, mode="plain")
    b = generate(dc, PROMPTS, max_new_tokens=N, mode="plain")
    assert a.tokens == b.tokens
    # no rollback: the left-padded prefill (3 x 5 positions), then one position per sequence per step
    assert dc.last_cache.positions_computed == len(PROMPTS) * 5 + a.totals["tokens_computed"] - 11
    check = WordListCheck([[t] for t in range(0, VOCAB, 9)])
    kw = dict(max_new_tokens=N, check=check, check_every=4, temperature=1.0, seed=5)
    a = generate(model, PROMPTS, mode="backtrack", **kw)
    b = generate(dc, PROMPTS, mode="backtrack", **kw)
    assert a.tokens == b.tokens and a.totals == b.totals and a.totals["backtracks"] > 0
    assert not any(any(check([t[j:j + 8] for j in range(len(t))])) for t in b.tokens if t)
    # the batch-wide crop makes the other sequences recompute: more than kfuse's tokens
    assert dc.last_cache.tokens_fed > a.totals["tokens_computed"]
    assert dc.last_cache.positions_computed >= dc.last_cache.tokens_fed


def test_dynamic_cache_baseline_passes_the_cache_by_the_models_keyword(hf_model):
    """transformers 5.25 renamed forward's past_key_values to cache (the old name warns and goes in 5.40; the pinned
    5.23 has only past_key_values): the baseline passes the cache by whichever name the model's forward takes."""
    from kfuse.demos.backtrack import DynamicCacheModel  # noqa: PLC0415

    class Renamed(torch.nn.Module):  # a model whose forward knows only the new name
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config, self.seen = hf_model, hf_model.config, []

        def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
            self.seen.append(cache)
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, use_cache=use_cache)

    renamed = Renamed()
    a = generate(DynamicCacheModel(hf_model), PROMPTS, max_new_tokens=N, mode="plain")
    b = generate(DynamicCacheModel(renamed), PROMPTS, max_new_tokens=N, mode="plain")
    assert a.tokens == b.tokens and renamed.seen and all(c is not None for c in renamed.seen)


def test_demo_corpus_injects_at_the_stated_rate():
    demo = pytest.importorskip("kfuse.demos.backtrack")
    pytest.importorskip("better_profanity")
    ids, tok, bad = demo.build_corpus(0.02, vocab_size=512, seed=1)
    assert len(tok) == 512 and all(w in tok.index for w in bad) and bad
    assert ProfanityCheck()(bad) == [True] * len(bad)  # the classifier flags every injected word alone
    # A stricter check injects only the words it flags: here the threshold drops the lowest-scored word.
    scores = sorted(ProfanityCheck().scores(bad))
    strict_threshold = (scores[0] + scores[1]) / 2
    _, _, strict = demo.build_corpus(0.02, vocab_size=512, seed=1, threshold=strict_threshold)
    assert strict == [w for w in bad if ProfanityCheck().scores([w])[0] > scores[0]] and len(strict) == len(bad) - 1
    assert ProfanityCheck(strict_threshold)(strict) == [True] * len(strict)
    bad_ids = torch.tensor([tok.index[w] for w in bad])
    share = torch.isin(ids, bad_ids).double().mean().item()
    assert abs(share - 0.02 / 1.02) < 0.004, share  # ~80k words: a binomial sd of ~0.0005
    text = "The statement, (if any): it raises."
    assert tok.decode(tok.encode(text)) == text.lower()


def test_demo_passes_its_threshold_to_the_corpus(monkeypatch):
    """--threshold reaches build_corpus, so every injected word is one the demo's check flags."""
    demo = pytest.importorskip("kfuse.demos.backtrack")
    seen = {}

    class Stop(Exception):
        pass

    def build_corpus(rate, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(demo, "build_corpus", build_corpus)
    with pytest.raises(Stop):
        demo.main(["--threshold", "0.9"])
    assert seen["threshold"] == 0.9


def test_demo_cost_per_token_kept_of_nothing_kept_is_inf():
    """A method that kept no token (a threshold of 0 flags every window) printed tokens computed per token
    kept as the tokens computed, a finite number (125.000 for 125 computed; demo hunt, 2026-12-05)."""
    from types import SimpleNamespace  # noqa: PLC0415

    demo = pytest.importorskip("kfuse.demos.backtrack")
    res = GenerationResult([[], []], None, [], forward_passes=9, wall_time=0.1)
    row = demo.Comparison.result(SimpleNamespace(check=None, check_every=4, tok=None), "reset", res, 125)
    assert row.tokens_kept == 0 and row.computed_per_kept == math.inf


def test_demo_end_to_end_small(tmp_path, capsys):
    """python -m kfuse.demos.backtrack on a tiny budget: the five methods run on the same prompts; plain
    leaves flagged windows, the four that check none; kfuse computes fewer tokens per token kept than the
    reset baseline and than backtracking on DynamicCache; the figure and the JSON are written."""
    demo = pytest.importorskip("kfuse.demos.backtrack")
    pytest.importorskip("better_profanity")
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "bt.png", tmp_path / "bt.json"
    sweep = demo.main(["--rates", "0.05", "--steps", "30", "--batch", "6", "--new-tokens", "16",
                       "--check-every", "4", "--png", str(png), "--json", str(js)])
    rows = {r.method: r for r in sweep[0.05]}
    assert list(rows) == ["plain", "reset", "kfuse", "dynamic-cache", "kfuse-offending"]
    for m in ("reset", "kfuse", "dynamic-cache", "kfuse-offending"):
        assert rows[m].violations == 0, rows[m]
    assert rows["plain"].tokens_kept == 6 * 16 and rows["plain"].backtracks == rows["plain"].resets == 0
    assert rows["plain"].violations > 0, rows["plain"]  # so the zeros above are not vacuous (19 seen)
    assert rows["kfuse"].backtracks > 0 and rows["reset"].resets > 0 and rows["reset"].backtracks == 0
    # the target (seen: kfuse 2.48, reset 5.06, dynamic-cache 4.19)
    kfuse_cost = rows["kfuse"].computed_per_kept
    assert kfuse_cost < rows["reset"].computed_per_kept and kfuse_cost < rows["dynamic-cache"].computed_per_kept
    assert png.stat().st_size > 0 and "dynamic-cache" in js.read_text()
    json.loads(js.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert "comp/kept" in capsys.readouterr().out


def _tiny_report_cases(device, quick):
    """A tiny decode case and the demo at its own test's budget (test_demo_end_to_end_small: 30 training steps,
    6 prompts, 16 tokens, checked every 4)."""
    from kfuse.bench import backtrack as bench  # noqa: PLC0415

    shape = dict(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64, vocab=97)
    return [bench.case(device, torch.float32, "decode", 3, 5, prompt=(2, 9), **shape),
            bench.demo_case(6, 16, rate=0.05, steps=30, every=4)]


def test_report_rows_tiny(report_rows):
    """``python -m kfuse --ops backtrack`` at tiny shapes: decode against transformers' generate (first
    tokens against float64); the demo's four generators on its trained model and classifier, with comp/kept,
    its ratio to plain's, kept, flagged windows and forward passes beside the time: the demo's own figures."""
    pytest.importorskip("better_profanity")
    pytest.importorskip("profanity_check")
    from kfuse.bench import backtrack as bench  # noqa: PLC0415
    from kfuse.demos.backtrack import compare  # noqa: PLC0415

    rows, ran, out = report_rows("backtrack", bench, _tiny_report_cases)
    by = {(r["mode"], r["name"]): r for r in rows}
    assert set(by) == {("decode", "kfuse"), ("decode", "transformers"), ("demo", "kfuse"), ("demo", "plain"),
                       ("demo", "reset"), ("demo", "dynamic-cache")}
    assert by["decode", "kfuse"]["target"] == 1.0 and by["decode", "transformers"]["ratio"] == 1.0
    assert by["decode", "kfuse"]["extra"]["tok/s"] > 0
    demo = {m: by["demo", m]["extra"] for m in bench.DEMO_METHODS}
    assert demo["plain"]["flagged"] > 0  # so the zeros below are not vacuous
    for m in ("kfuse", "reset", "dynamic-cache"):
        assert demo[m]["flagged"] == 0
    cost = {m: demo[m]["comp/kept"] for m in bench.DEMO_METHODS}
    assert cost["kfuse"] < cost["reset"] and cost["kfuse"] < cost["dynamic-cache"], cost
    assert demo["kfuse"]["comp/kept vs plain"] == pytest.approx(cost["kfuse"] / cost["plain"])
    assert by["demo", "plain"]["ratio_to"] == "plain" and by["demo", "kfuse"]["target"] is None
    assert "comp/kept vs plain" in out and "demo" in out
    # the rows are the demo's figures: the same model (demos.backtrack.prepare's, kept by the bench), prompts,
    # seeds and check
    hf, tok, prompts = bench._prepared(0.05, 30, 6)
    want = {r.method: r for r in compare(hf, tok, prompts, max_new_tokens=16, check_every=4,
                                         methods=bench.DEMO_METHODS)}
    for m in bench.DEMO_METHODS:
        assert (demo[m]["comp/kept"], demo[m]["kept"], demo[m]["flagged"], demo[m]["passes"]) == (
            want[m].computed_per_kept, want[m].tokens_kept, want[m].violations, want[m].forward_passes), m


def test_report_cases(monkeypatch):
    """The CPU report: decode, then the demo at 0.01 and 0.03 after 600 training steps (quick: 0.03 after 100);
    CUDA: decode alone; without the demo's dependencies, no demo cases."""
    from kfuse.bench import backtrack as bench  # noqa: PLC0415

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(bench, "_demo_missing", lambda: "")
    full, quick = bench.cases(cpu, False), bench.cases(cpu, True)
    assert [c.mode for c in full] == ["decode", "demo", "demo"] and [c.mode for c in quick] == ["decode", "demo"]
    assert [(c.params["rate"], c.params["steps"], c.shape) for c in full[1:]] == [(0.01, 600, (32, 64)),
                                                                                  (0.03, 600, (32, 64))]
    assert [(c.params["rate"], c.params["steps"]) for c in quick[1:]] == [(0.03, 100)]
    assert bench.names(quick[1]) == ["kfuse", "plain", "reset", "dynamic-cache"]
    assert [c.mode for c in bench.cases(cuda, False)] == [c.mode for c in bench.cases(cuda, True)] == ["decode"]
    monkeypatch.setattr(bench, "_demo_missing", lambda: "better-profanity not installed")
    assert [c.mode for c in bench.cases(cpu, False)] == ["decode"]


def test_report_graphs_candidate_reuses_one_cache():
    """The report's ``kfuse-graphs`` decode (a CUDA row) run here on the CPU, where the graph step runs
    eagerly: the eager candidate's tokens, run after run on one kept cache whose sequences are freed."""
    from kfuse.bench import backtrack as bench  # noqa: PLC0415

    case = _tiny_report_cases(torch.device("cpu"), True)[0]
    inp = bench.make_inputs(case, 0)
    want = bench._kfuse_decode(case, inp)
    for _ in range(2):
        assert torch.equal(bench._kfuse_decode(case, inp, graphs=True), want)
        assert inp.graphed.cache.active_sequences == []
    first = inp.graphed
    bench._kfuse_decode(case, inp, graphs=True)
    assert inp.graphed is first


def test_ban_offending_bans_the_flagged_token_for_the_rest_of_the_sequence(model):
    """ban="offending": the token the check flags on its own is never sampled again by that sequence, so
    a check on one token id flags each sequence at most once (ban="first" only bans it at one position)."""
    kw = dict(max_new_tokens=40, temperature=1.5, seed=11)
    sampled = generate(model, PROMPTS, mode="plain", **kw)
    common = max(range(VOCAB), key=lambda t: sum(x.count(t) for x in sampled.tokens))
    check = WordListCheck([[common]])
    first = generate(model, PROMPTS, mode="backtrack", check=check, check_every=4, ban="first", **kw)
    offending = generate(model, PROMPTS, mode="backtrack", check=check, check_every=4, ban="offending", **kw)
    assert_invariants(offending)
    assert sum(s.flags for s in offending.stats) >= 1
    assert all(s.flags <= 1 for s in offending.stats), [s.flags for s in offending.stats]
    assert all(common not in t for t in offending.tokens)
    assert sum(s.flags for s in first.stats) >= sum(s.flags for s in offending.stats)
    with pytest.raises(ValueError, match="ban"):
        generate(model, PROMPTS, mode="backtrack", check=check, max_new_tokens=2, ban="all")


def test_sampler_draws_from_the_restricted_softmax():
    """kfuse.backtrack._sample (batched, inverse CDF): empirical frequencies over 20000 rows match the
    softmax at the temperature restricted to top-k / top-p, renormalised; banned and cut tokens never come."""
    from kfuse.backtrack import _sample  # noqa: PLC0415

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    n, g = 20000, torch.Generator().manual_seed(0)
    for temperature, top_k, top_p, banned, allowed in [
        (1.0, None, 1.0, set(), [0, 1, 2, 3, 4, 5]),
        (0.7, 3, 1.0, {5}, [0, 1, 2]),  # 5 banned first, then the 3 most likely of the rest
        (1.0, None, 0.85, set(), [5, 0, 1]),  # p(5) + p(0) = 0.83 < 0.85: the third most likely stays, not the 4th
    ]:
        picks = _sample(logits.expand(n, -1), [banned] * n, temperature, top_k, top_p, [g] * n)
        freq = torch.bincount(torch.tensor(picks), minlength=6).double() / n
        want = torch.full((6,), float("-inf"), dtype=torch.float64)
        want[allowed] = logits.double()[allowed] / temperature
        want = want.softmax(-1)
        assert (freq[want == 0] == 0).all(), freq
        assert (freq - want).abs().max() < 0.015, (freq, want)  # ~4.5 binomial sd at n = 20000
    assert _sample(logits.expand(2, -1), [set(), {5}], 0.0, None, 1.0, [g, g]) == [5, 0]


@pytest.mark.cuda
def test_generate_on_cuda():
    """generate() with a CUDA model (Triton attention; the cache's device metadata replaying the host's
    writes): plain greedy equals a greedy loop on the same device (same call shapes, same bits),
    backtracking leaves no flagged window and keeps the invariants, and afterwards the cache's device
    metadata equals its host state."""
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).cuda().eval())
    plain = generate(model, PROMPTS, max_new_tokens=N, mode="plain")
    expected = greedy_loop(model)
    assert plain.tokens == expected
    check = WordListCheck([[t] for t in range(0, VOCAB, 9)])
    cache = model.new_cache(page_size=4, num_pages=64, max_seqs=3)
    res = generate(model, PROMPTS, max_new_tokens=N, check=check, check_every=4, temperature=1.0, seed=5,
                   cache=cache)
    assert_invariants(res)
    assert res.totals["backtracks"] > 0
    assert not any(any(check([t[j:j + 8] for j in range(len(t))])) for t in res.tokens if t)
    assert torch.equal(cache._flat.cpu(), cache._h_flat)
    # The decode steps replayed from CUDA graphs (one per batch size): the eager steps' greedy tokens
    # (a different last bit would have to flip an argmax), and backtracking's invariants on one cache.
    assert generate(model, PROMPTS, max_new_tokens=N, mode="plain", decode_graphs=True).tokens == expected
    res = generate(model, PROMPTS, max_new_tokens=N, check=check, check_every=4, temperature=1.0, seed=5,
                   cache=cache, decode_graphs=True)
    assert_invariants(res)
    assert not any(any(check([t[j:j + 8] for j in range(len(t))])) for t in res.tokens if t)
    assert torch.equal(cache._flat.cpu(), cache._h_flat)


def test_offending_bans_stop_when_no_room_is_left(model):
    """ban="offending" once the sequence-wide bans have no room left (max_flags + 1 tokens must stay):
    no more such bans, the run goes on (it crashed with a bare zip() error), both when the room is 0 from
    the start and when a check that flags many ids uses it up."""
    first = generate(model, [PROMPTS[0]], max_new_tokens=4, mode="plain").tokens[0][0]
    kw = dict(max_new_tokens=4, check=WordListCheck([[first]]), check_every=2, max_backtracks=VOCAB - 2,
              on_limit="stop")
    assert generate(model, [PROMPTS[0]], ban="offending", **kw).tokens == \
        generate(model, [PROMPTS[0]], **kw).tokens
    res = generate(model, [[1], [7, 8]], max_new_tokens=12, check=WordListCheck([[t] for t in range(VOCAB) if t % 3]),
                   check_every=2, max_backtracks=20, max_resets=3, ban="offending", temperature=1.0, seed=0)
    assert_invariants(res)


def test_word_list_matches_whole_words_that_start_or_end_with_symbols():
    """Whole words are entries with no word character just before or after: obfuscated entries ("@ss",
    "$hit", "a$$") match on their own, and not inside a longer word."""
    check = WordListCheck(["@ss", "$hit", "a$$", "damn"])
    texts = ["you @ss", "oh $hit!", "what an a$$ you are", "a$$hole", "damn it", "damnation", "x@ssy", "DAMN."]
    assert check(texts) == [True, True, True, False, True, False, False, True]


def test_sampling_infinite_logits():
    """A +inf logit takes all the probability (the softmax's limit; several +inf ones share it), and a row
    whose tokens not banned all have -inf logits is an error naming the prompt. Sampling subtracted the
    row's max, +inf, made every logit NaN and drew an arbitrary token, banned ones too; greedy took id 0 of
    an all -inf row, banned or not (generator hunt, 2026-12-05)."""
    from kfuse.backtrack import _sample, _seeded_generator  # noqa: PLC0415

    inf = float("inf")
    rows = torch.tensor([[0.0, inf, 0.0, 0.0], [inf, 2.0, inf, -inf], [1.0, -inf, -inf, 2.0]])
    for t in (0.0, 1.0, 7.0):
        for seed in range(30):
            picks = _sample(rows, [set(), {0}, {3}], t, None, 1.0, [_seeded_generator(seed, i) for i in range(3)])
            assert picks == [1, 2, 0], (t, seed)
    draws = {_sample(rows[1:2], [set()], 1.0, None, 1.0, [_seeded_generator(s, 0)])[0] for s in range(40)}
    assert draws == {0, 2}  # the two +inf tokens, equally likely
    for t in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"no token to draw for prompts \[7\]: every token not banned has a "
                                             r"-inf logit"):
            _sample(rows, [set(), set(), {0, 3}], t, None, 1.0, [_seeded_generator(0, i) for i in range(3)],
                    [5, 6, 7])


def test_sampling_extremes_keep_the_bans_and_the_limits():
    """Temperatures near 0 give the best allowed token (a banned best one gives the second), a huge one
    (inf in float32) never draws a banned id, and a top_p below float32's smallest number keeps the top
    token: float32 overflow made the rows NaN, and a NaN cdf picked the last id, banned or not."""
    from kfuse.backtrack import _sample, _seeded_generator  # noqa: PLC0415

    rows = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)) * 3
    best = rows.argmax(-1)
    second = rows.topk(2, -1).indices[:, 1].tolist()
    banned = [{int(b)} for b in best]

    def gens(seed=0):
        return [_seeded_generator(seed, i) for i in range(3)]

    for t in (1e-3, 1e-38, 1e-40, 1e-45, 1e-46, 5e-324):  # the last two are 0 in float32 (bug hunt: drew uniformly)
        assert _sample(rows, [set()] * 3, t, None, 1.0, gens()) == best.tolist()
        assert _sample(rows, banned, t, None, 1.0, gens()) == second
    assert _sample(rows, [set()] * 3, 1.0, None, 1e-300, gens()) == best.tolist()
    for seed in range(20):
        picks = _sample(rows, banned, 1e300, None, 1.0, gens(seed))
        assert all(p not in b for p, b in zip(picks, banned, strict=True))


def test_demo_refuses_bad_arguments_before_training(tmp_path):
    """Zero or negative counts, a rate of 1, a NaN temperature or a missing output folder are argparse
    errors before any model trains (they failed after training, or divided by zero); prompts that cannot
    be found (an injection rate so high no clean window exists) raise instead of looping forever."""
    demo = pytest.importorskip("kfuse.demos.backtrack")
    for args in (["--steps", "0"], ["--batch", "-1"], ["--new-tokens", "0"], ["--check-every", "0"],
                 ["--rates", "0.01", "1"], ["--temperature", "nan"], ["--threads", "0"],
                 ["--png", "/nonexistent/x.png"], ["--json", "/nonexistent/x.json"],
                 # bug hunt: these failed after training with a traceback
                 ["--png", str(tmp_path)], ["--json", str(tmp_path)], ["--png", str(tmp_path / "x.xyz")],
                 ["--seed", str(2**64)], ["--seed", str(2**63)],
                 ["--png", "/sys/x.png"], ["--json", "/sys/x.json"],  # unwritable (2026-12-04)
                 # files hunt (2026-12-06): torch.set_num_threads' traceback; a name without extension is
                 # written with .png (here a folder)
                 ["--threads", str(2**31)], ["--png", str(tmp_path / "fig")]):
        (tmp_path / "fig.png").mkdir(exist_ok=True)
        with pytest.raises(SystemExit):
            demo.main(args)
    # A rate of 0 is drawn on the figure's x axis (a log axis had no place for it).
    row = demo.MethodResult("kfuse", 0, 0, 10, 12, 1.2, 3, 1, 0, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        demo._plot({0.0: [row], 0.01: [row]}, str(tmp_path / "rates.png"))
    assert (tmp_path / "rates.png").stat().st_size > 0
    ids = torch.arange(1, 200)
    with pytest.raises(ValueError, match="no clean prompt"):
        demo._prompts(ids, set(range(200)), 2, 0)
