"""Tests of kfuse.models.LlamaForCausalLM: a tiny random transformers Llama run on kfuse's paged KV
cache against transformers' own forward, plus rollback / fork / isolation at the model level (the
checks that catch real bugs in other caches, as tests/test_kv.py's at the cache level).

Bitwise comparisons keep every call's shapes equal between the two runs: a CPU GEMM's bits for a row
depend on the number of rows M (measured: rows of F.linear differ between M = 1, 2 and 5), while
kfuse's attention kernels are bit-identical whatever the rest of the batch (on CUDA, a call of fresh
prompts of one length of at least kfuse.ops.kv._FLASH_MIN_Q_LEN tokens runs flash attention instead,
whose bits depend on the call; these tests' prompts are shorter).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from interrupts import RaisesAfter
from tolerances import assert_close
from torch.overrides import TorchFunctionMode

transformers = pytest.importorskip("transformers")

import kfuse  # noqa: E402
import kfuse.models.llama as llama_mod  # noqa: E402
from kfuse.kv import PagedKVCache  # noqa: E402
from kfuse.models import LlamaForCausalLM  # noqa: E402

VOCAB = 101
CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
           intermediate_size=128, max_position_embeddings=64,
           initializer_range=0.2)  # 10x HF's default: attention far from uniform, so position errors show
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


@pytest.fixture(autouse=True)
def _two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


# Every model-level check runs on the CPU and, marked ``cuda``, on the GPU (Triton attention kernels,
# cuBLAS GEMMs; float32 both).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def build(device: str = "cpu", **kw) -> tuple[transformers.LlamaForCausalLM, LlamaForCausalLM]:
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CFG, **kw})).to(device).eval()
    return hf, LlamaForCausalLM.from_hf(hf)


@torch.no_grad()
def hf_logits(hf: transformers.LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' own forward over a whole sequence, no cache: ``[len, vocab]``."""
    return hf(tokens[None].to(hf.device)).logits[0]


def rand_tokens(n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,))


def test_model_under_torch_compile_prefills_and_decodes():
    """torch.compile of the model (graph breaks allowed: its steps read the cache's host state) gives eager's
    logits for a prefill of ragged prompts and a decode step. The prefill raised kfuse's own error: the
    model passed q_lens as a tensor, whose values tracing cannot read (compile hunt, 2026-12-05)."""
    hf, model = build()
    prompts = [rand_tokens(3), rand_tokens(5)]
    runs = []
    for m in (model, torch.compile(model, backend="eager")):
        cache = model.new_cache(page_size=4, num_pages=16, max_seqs=2)
        ids = [cache.add_sequence(), cache.add_sequence()]
        with torch.no_grad():
            pre = m(prompts, ids, cache)
            step = m([p[-1:] for p in prompts], ids, cache)
        runs.append((pre, step, [cache.length(s) for s in ids]))
    for (a, b, n), (c, d, k) in zip(runs[:1], runs[1:], strict=True):
        assert n == k == [4, 6]
        for x, y in zip([*a, *b], [*c, *d], strict=True):
            assert_close(y, x, torch.float32, "compiled vs eager")


@pytest.mark.parametrize("kw", [{}, {"rope_scaling": LLAMA3}, {"tie_word_embeddings": True}],
                         ids=["default", "llama3-rope", "tied"])
@pytest.mark.parametrize("device", DEVICES)
def test_ragged_prefill_and_decode_match_transformers(kw, device):
    hf, model = build(device, **kw)
    hf_params = {id(p) for p in hf.parameters()}
    assert {id(p) for p in model.parameters()} <= hf_params  # shared, not copied
    if kw.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.embed_tokens.weight
    cache = model.new_cache(page_size=4, num_pages=32, max_seqs=4)
    assert (cache.dtype, cache.device.type) == (torch.float32, device)
    ids = [cache.add_sequence() for _ in range(3)]
    seqs = [rand_tokens(n) for n in (5, 1, 17)]  # 17 > original_max_position_embeddings of LLAMA3
    got = [[x] for x in model(seqs, ids, cache)]
    for step in range(3):
        # greedy next tokens; at step 1 sequence 1 gets none (a [0, vocab] result, its length stays)
        new = [torch.zeros(0, dtype=torch.int64) if (step, i) == (1, 1) else g[-1][-1:].argmax(-1).cpu()
               for i, g in enumerate(got)]
        out = model(new, ids, cache)
        for i in range(3):
            assert out[i].shape == (len(new[i]), VOCAB)
            seqs[i] = torch.cat([seqs[i], new[i]])
            got[i].append(out[i])
    for i, s in enumerate(ids):
        assert cache.length(s) == len(seqs[i])
        assert_close(torch.cat(got[i]), hf_logits(hf, seqs[i]), torch.float32, f"sequence {i}")


def test_weights_stay_shared_through_assigning_loads():
    """A load_state_dict(assign=True) or .to() of either model replaces Parameter objects: the kfuse model
    holds HF's modules, so both keep computing with the same weights (the norm weights were held as
    Parameters, and after an assigning load into the HF model kfuse ran old norms with new projections,
    11.2 off in the logits; state bug hunt)."""
    hf, model = build()
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(hf.config).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    tokens = rand_tokens(7)

    def kfuse_logits(m: LlamaForCausalLM) -> torch.Tensor:
        cache = m.new_cache(page_size=4, num_pages=8, max_seqs=1)
        return m([tokens], [cache.add_sequence()], cache)[0]

    hf.load_state_dict(other.state_dict(), assign=True)
    assert_close(kfuse_logits(model), hf_logits(hf, tokens), torch.float32, "after hf's assigning load")
    hf2, model2 = build()
    model2.load_state_dict(LlamaForCausalLM.from_hf(other).state_dict(), assign=True)
    assert_close(hf_logits(hf2, tokens), hf_logits(other, tokens), torch.float32, "after kfuse's assigning load")
    hf3, model3 = build()
    model3.to(torch.float64)
    assert {p.dtype for p in hf3.parameters()} == {torch.float64}


def test_a_vocabulary_resized_after_from_hf_is_refused_until_rebuilt():
    """hf.resize_token_embeddings resizes the embedding in place and gives hf a new lm_head: the model built
    before ran the old head over the new embedding (logits of the old vocabulary, the new tokens refused as
    out of range; bug hunt). It refuses every call, naming the cause, until built again, which then matches."""
    hf, model = build()
    cache = model.new_cache(page_size=4, num_pages=8, max_seqs=1)
    s = cache.add_sequence()
    hf.resize_token_embeddings(VOCAB + 7, mean_resizing=False)
    tokens = torch.tensor([1, VOCAB + 3, 2])
    for call in (lambda: model([tokens], [s], cache), lambda: model.decode_graphs(cache, max_len=8)(tokens[:1], [s]),
                 lambda: model.vocab_size):
        with pytest.raises(ValueError, match="resized after this model was built"):
            call()
    assert cache.length(s) == 0 and cache._step is None
    model = LlamaForCausalLM.from_hf(hf)
    assert model.vocab_size == VOCAB + 7
    assert_close(model([tokens], [s], cache)[0], hf_logits(hf, tokens), torch.float32, "rebuilt")


def test_an_hf_model_changed_after_from_hf_is_refused_until_rebuilt():
    """The model runs the modules it took from the HF model. One replaced there since (LoRA layers added by
    peft.get_peft_model, a new lm_head of the same shape, a new rotary module), layers removed, or
    config.num_hidden_layers lowered (transformers then runs the first layers: early exit) went unseen: it ran
    the old modules, silently (LoRA skipped: logits 7.1 off PEFT's; Llama hunt, 2026-12-07). Every call is
    refused, naming the change, until the model is built again, which then matches."""
    peft = pytest.importorskip("peft")
    tokens = rand_tokens(5)

    def refused(model, match):
        cache = model.new_cache(page_size=4, num_pages=8, max_seqs=1)
        s = cache.add_sequence()
        graphs = model.decode_graphs(cache, max_len=8)
        for call in (lambda: model([tokens], [s], cache), lambda: graphs(tokens[:1], [s])):
            with pytest.raises(RuntimeError, match=match):
                call()
        assert cache.length(s) == 0 and cache._step is None

    hf, model = build()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, init_lora_weights=False, target_modules=["v_proj"])).eval()
    refused(model, r"LlamaAttention.v_proj was replaced after this model was built")
    with torch.no_grad():
        want = pm(input_ids=tokens[None]).logits[0]
    rebuilt = LlamaForCausalLM.from_hf(pm)
    cache = rebuilt.new_cache(page_size=4, num_pages=8, max_seqs=1)
    assert_close(rebuilt([tokens], [cache.add_sequence()], cache)[0], want, torch.float32, "rebuilt over PEFT")

    hf, model = build()
    hf.set_output_embeddings(torch.nn.Linear(CFG["hidden_size"], VOCAB, bias=False))
    refused(model, r"LlamaForCausalLM.lm_head was replaced")
    hf, model = build()
    hf.config.num_hidden_layers -= 1
    refused(model, r"config.num_hidden_layers=1, 2 in model.layers\); this model was built with 2")
    with pytest.raises(ValueError, match="runs 1 of its 2 decoder layers"):
        LlamaForCausalLM.from_hf(hf)
    hf, model = build()
    del hf.model.layers[1]
    refused(model, r"config.num_hidden_layers=2, 1 in model.layers")

    class Unhashable(torch.nn.Module):  # (its __eq__ alone makes it unhashable: the watch's hook must pass it by)
        def __eq__(self, other: object) -> bool:
            return self is other

    Unhashable().child = torch.nn.Linear(2, 2)


def test_a_cpu_model_runs_under_another_default_device():
    """Under torch.set_default_device("cuda") (here "meta", which every machine has) a CPU model's step made
    its positions on the default device ("Tensor on device meta is not on the expected device cpu"; bug
    hunt): prefill and decode there give the logits they give outside it, bit for bit."""
    _, model = build()
    prompts = [rand_tokens(5), rand_tokens(2)]

    def run() -> list[torch.Tensor]:
        cache = model.new_cache(page_size=4, num_pages=16, max_seqs=2)
        ids = [cache.add_sequence() for _ in range(2)]
        first = model(prompts, ids, cache)
        return [*first, *model([o[-1:].argmax(-1) for o in first], ids, cache)]

    want = run()
    with torch.device("meta"):
        got = run()
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_rollback_and_refeed_is_bit_identical(device):
    hf, model = build(device)
    cache = model.new_cache(page_size=4, num_pages=32, max_seqs=4)
    ids = [cache.add_sequence() for _ in range(2)]
    prompts = [rand_tokens(3), rand_tokens(6)]
    last = [o[-1:] for o in model(prompts, ids, cache)]
    n, back = 9, 6  # generate 9 tokens each, roll each back by 6 (to c = 6 and 9), crossing pages
    toks, first = [], []
    for _ in range(n):
        nxt = [x.argmax(-1) for x in last]
        last = model(nxt, ids, cache)
        toks.append(nxt)
        first.append(last)
    lens = [cache.length(s) for s in ids]
    pages_before = cache.stats()["pages_used"]
    cache.rollback(ids, [x - back for x in lens])
    assert cache.stats()["pages_used"] < pages_before  # whole pages past the checkpoints were freed
    for j in range(n - back, n):
        again = model(toks[j], ids, cache)
        for a, b in zip(again, first[j], strict=True):
            assert torch.equal(a, b), f"step {j}: logits after rollback differ"
    assert [cache.length(s) for s in ids] == lens
    full = torch.cat([prompts[1].to(device), *[t[1] for t in toks]])
    assert_close(torch.cat([f[1] for f in first]), hf_logits(hf, full)[len(prompts[1]):], torch.float32)


def test_dynamic_rope_calls_do_not_depend_on_earlier_calls():
    """transformers' ``dynamic`` rotary module keeps the longest length it has seen: a 20-token prompt's
    logits (max_position_embeddings 16) moved by 2.4 after an unrelated 40-token call, so rollback-and-
    refeed and seeded generation did not repeat (bug hunt). Each call now matches a fresh HF model."""
    kw = dict(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    hf, model = build(**kw)
    fresh, _ = build(**kw)  # the same weights, a rotary module no call has touched
    prompt, other = rand_tokens(20), rand_tokens(40)

    def prefill(tokens):
        cache = model.new_cache(page_size=4, num_pages=32, max_seqs=2)
        s = cache.add_sequence()
        return model([tokens], [s], cache)[0], cache, s

    first, cache, s = prefill(prompt)
    prefill(other)
    assert torch.equal(prefill(prompt)[0], first)
    assert_close(first, hf_logits(fresh, prompt), torch.float32)
    steps = [model([t[None]], [s], cache)[0] for t in other[:6]]  # decode past the prompt, then back
    cache.rollback([s], [20])
    prefill(other)
    assert all(torch.equal(model([t[None]], [s], cache)[0], x) for t, x in zip(other[:6], steps, strict=True))


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [3.0] * 8,
                                   "original_max_position_embeddings": 16}])
def test_rope_by_largest_position_isolates_the_batch(rope):
    """The rotary types that pick their frequencies from the largest position they are given (dynamic,
    longrope) were called once for a step's batch: a 5-token sequence beside a 30-token one (past the original
    16 positions) got the long one's frequencies, its logits 0.8 (longrope: 4.8) from HF's for it alone, and
    rolling the long one back changed them (Llama hunt, 2026-12-05). Each sequence now gets its own."""
    kw = dict(max_position_embeddings=16, rope_scaling=rope)
    if rope["rope_type"] == "longrope":
        kw["max_position_embeddings"] = 64  # the model's; the original 16 decides short or long
    hf, model = build(**kw)
    fresh, _ = build(**kw)  # HF's rotary module keeps state: an untouched one for each reference
    long, short, step = rand_tokens(30), rand_tokens(5), [rand_tokens(1), rand_tokens(1)]
    cache = model.new_cache(page_size=4, num_pages=64, max_seqs=2)
    a, b = cache.add_sequence(), cache.add_sequence()
    prefill = model([long, short], [a, b], cache)
    assert_close(prefill[1], hf_logits(fresh, short), torch.float32, "the short prompt beside the long one")
    out = model(step, [a, b], cache)
    assert_close(out[1], hf_logits(build(**kw)[0], torch.cat([short, step[1]]))[-1:], torch.float32, "its step")
    cache.rollback([a, b], [4, 5])
    assert torch.equal(model(step, [a, b], cache)[1], out[1]), "the long sequence's rollback moved the short one"


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [3.0] * 8,
                                   "original_max_position_embeddings": 16}])
def test_rope_by_largest_position_is_thread_safe(rope):
    """One model shared by threads, each with its own cache (documented as independent): kfuse reset HF's
    rotary module, then called it, and another thread's call in between (its reset or growth) gave the call
    the other's frequencies (threads hunt: 6-17 of 1,320 calls from 6 threads had logits 8-22 off, logits ~15;
    the HF model's own calls share the module too). Rare by chance, so placed here: after each torch call of
    this thread's call (where torch lets other threads in), another thread makes a whole call of another
    length, below or above the original 16 positions, on its own cache or through the HF model. Every call
    bit for bit as alone (old code: 0.2 to 7 off, each pair; the longrope pair 40 beside 30 agrees there)."""
    kw = dict(max_position_embeddings=16, rope_scaling=rope, num_hidden_layers=1)  # 1 layer: ~280 torch calls
    if rope["rope_type"] == "longrope":
        kw["max_position_embeddings"] = 64  # the model's; the original 16 decides short or long
    hf, model = build(**kw)
    prompts = {n: rand_tokens(n) for n in (6, 30, 40)}

    def prefill(tokens):
        cache = model.new_cache(page_size=4, num_pages=16, max_seqs=1)
        s = cache.add_sequence()
        return model([tokens], [s], cache)[0]

    alone = {n: prefill(t) for n, t in prompts.items()}

    class Between(TorchFunctionMode):  # this thread's only (torch's function modes are per thread)
        def __init__(self, other: torch.Tensor) -> None:
            super().__init__()
            self.other, self.calls = other, 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.calls += 1
            run = prefill if self.calls % 2 else lambda t: hf_logits(hf, t)
            pool.submit(run, self.other).result()
            return out

    with ThreadPoolExecutor(1) as pool:
        for n, other in [(6, 40), (40, 6), (40, 30)]:
            with Between(prompts[other]) as between:
                out = prefill(prompts[n])
            assert between.calls > 100
            assert torch.equal(out, alone[n]), f"{n} tokens, a {other}-token call between each torch call"


def test_norm_modules_run_with_their_hooks():
    """The model read its norm modules' weight and ran its own RMSNorm: hooks on them, and wrappers such as
    PEFT's LN tuning (whose weight is the base layer's), were skipped silently (logits 0.45 from the
    adapter's; Llama hunt, 2026-12-05). They are called, as HF calls them."""
    hf, model = build()
    hf.model.layers[0].input_layernorm.register_forward_hook(lambda m, args, out: out * 3)
    hf.model.norm.register_forward_hook(lambda m, args, out: out - 1)
    prompt = rand_tokens(9)
    cache = model.new_cache(page_size=4, num_pages=16, max_seqs=1)
    s = cache.add_sequence()
    assert_close(model([prompt], [s], cache)[0], hf_logits(hf, prompt), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_rollback_of_one_sequence_leaves_the_others_bit_identical(device):
    hf, model = build(device)
    prompts = [rand_tokens(n) for n in (7, 4, 10)]
    caches = []
    for _ in range(2):  # two caches through the same calls
        cache = model.new_cache(page_size=4, num_pages=32, max_seqs=4)
        ids = [cache.add_sequence() for _ in range(3)]
        model(prompts, ids, cache)
        caches.append(cache)
    caches[1].rollback([ids[1]], [1])  # sequence 1 backs up to its first token, in one cache only
    step = [rand_tokens(1) for _ in range(3)]
    a, b = (model(step, ids, c) for c in caches)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[1], b[1])
    assert_close(b[1], hf_logits(hf, torch.cat([prompts[1][:1], step[1]]))[-1:], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_fork_mid_page(device):
    hf, model = build(device)
    prompt = rand_tokens(6)  # 1.5 pages of 4: the fork shares a partially filled page
    with_fork = model.new_cache(page_size=4, num_pages=32, max_seqs=4)
    parent = with_fork.add_sequence()
    model([prompt], [parent], with_fork)
    child = with_fork.fork(parent, 6)
    # The run without the fork has a twin sequence, prefilled the same way, in the child's place: every
    # call then has the same shapes, so the parent's logits must match bit for bit.
    without = model.new_cache(page_size=4, num_pages=32, max_seqs=4)
    p2, twin = without.add_sequence(), without.add_sequence()
    model([prompt], [p2], without)
    model([prompt], [twin], without)
    p_toks, c_toks = rand_tokens(4), rand_tokens(4)  # different continuations, past the page boundary
    child_logits = []
    for j in range(4):
        a = model([p_toks[j:j + 1], c_toks[j:j + 1]], [parent, child], with_fork)
        b = model([p_toks[j:j + 1], c_toks[j:j + 1]], [p2, twin], without)
        assert torch.equal(a[0], b[0]), f"step {j}: the parent's logits changed by the fork"
        assert torch.equal(a[1], b[1]), f"step {j}: the child's logits differ from the twin's"
        child_logits.append(a[1])
    assert with_fork.length(parent) == with_fork.length(child) == 10
    expected = hf_logits(hf, torch.cat([prompt, c_toks]))[len(prompt):]
    assert_close(torch.cat(child_logits), expected, torch.float32, "child vs transformers")


def test_bad_input_raises_and_leaves_the_cache_unchanged(monkeypatch):
    hf, model = build()
    cache = model.new_cache(page_size=4, num_pages=32, max_seqs=4)
    ids = [cache.add_sequence() for _ in range(2)]
    model([rand_tokens(5), rand_tokens(2)], ids, cache)
    before = ([cache.length(s) for s in ids], cache.stats())
    good = [rand_tokens(2), rand_tokens(1)]
    cases = [
        ((good[0], ids, cache), TypeError, "tokens must be a list"),
        (([good[0], good[1].float()], ids, cache), TypeError, r"tokens\[1\]"),
        (([good[0][None], good[1]], ids, cache), TypeError, r"tokens\[0\]"),
        (([good[0], torch.tensor([VOCAB])], ids, cache), ValueError, r"tokens\[1\].*vocab_size"),
        ((good, ids[:1], cache), ValueError, "seq_ids"),
        ((good, [ids[0], 3], cache), ValueError, "seq_ids"),  # not active: the cache's own error
        ((good, ids, object()), TypeError, "cache"),
        ((good, ids, PagedKVCache(3, 2, 16, 4, 4, 2)), ValueError, "cache has"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            model(*args)
    with pytest.raises(ValueError, match="counts"):
        model.forward_packed(torch.cat(good), [1, 1], ids, cache)
    ids3 = [*ids, cache.add_sequence()]
    with pytest.raises(ValueError, match="counts"):  # their int64 sum wraps to 1 (was: repeats can not be negative)
        model.forward_packed(rand_tokens(1), [2**63 - 1, 2**63 - 1, 3], ids3, cache)
    cache.free(ids3[2])
    with pytest.raises(TypeError, match="flat_tokens"):
        model.forward_packed(torch.cat(good).int(), [2, 1], ids, cache)
    assert ([cache.length(s) for s in ids], cache.stats()) == before

    # An error in the middle of a step (layer 1's attention, after both layers appended) aborts it.
    real = llama_mod.paged_prefill_attention

    def failing(q, cache, layer, *args, **kwargs):
        if layer == 1:
            raise RuntimeError("injected")
        return real(q, cache, layer, *args, **kwargs)

    monkeypatch.setattr(llama_mod, "paged_prefill_attention", failing)
    with pytest.raises(RuntimeError, match="injected"):
        model(good, ids, cache)
    monkeypatch.undo()
    assert ([cache.length(s) for s in ids], cache.stats()) == before
    assert [o.shape for o in model([good[0], torch.zeros(0, dtype=torch.int64)], ids, cache)] == [(2, VOCAB),
                                                                                                 (0, VOCAB)]
    assert model([], [], cache) == []


def test_lora_adapters_run_on_kfuse_lora_op(monkeypatch):
    """A PEFT-wrapped Llama (LoRA r=4 on every projection, non-zero B): from_hf fuses its LoRA layers
    (kfuse.lora_linear runs them) and the logits match PEFT's own forward."""
    peft = pytest.importorskip("peft")
    from kfuse.integrations.peft import fused_layers, unfuse  # noqa: PLC0415

    hf, _ = build()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(hf, cfg).eval()
    seqs = [rand_tokens(n) for n in (6, 3)]
    with torch.no_grad():
        expected = [pm(input_ids=s[None]).logits[0] for s in seqs]  # PEFT's forward, before fusing
    model = LlamaForCausalLM.from_hf(pm)
    assert len(fused_layers(pm)) == 2 * 7
    calls = []
    real = kfuse.lora_linear
    monkeypatch.setattr(kfuse, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = model.new_cache(page_size=4, num_pages=16, max_seqs=2)
    ids = [cache.add_sequence() for _ in seqs]
    got = model([s[:-1] for s in seqs], ids, cache)  # prefill, then the last token as a decode step
    last = model([s[-1:] for s in seqs], ids, cache)
    assert len(calls) == 2 * 2 * 7  # two calls, 2 layers x 7 projections each
    for i in range(2):
        assert_close(torch.cat([got[i], last[i]]), expected[i], torch.float32, f"sequence {i}")
    unfuse(pm)
    assert fused_layers(pm) == []
    LlamaForCausalLM.from_hf(pm, fuse_lora=False)
    assert fused_layers(pm) == []


def test_prompt_learning_adapters_are_refused():
    """Prompt tuning and prefix tuning keep their virtual tokens / prefix key-values on the PeftModel, not in
    the layers: from_hf refuses them, naming the method, where unwrapping ran the base model silently."""
    peft = pytest.importorskip("peft")
    for cfg in (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)):
        hf, _ = build()
        with pytest.raises(ValueError, match="prompt-learning"):
            LlamaForCausalLM.from_hf(peft.get_peft_model(hf, cfg))


def test_fuse_lora_takes_bools_only():
    """fuse_lora='False' fused (a truthy string; error-message hunt): refused, named."""
    hf, _ = build()
    with pytest.raises(TypeError, match="fuse_lora must be a bool; got str"):
        LlamaForCausalLM.from_hf(hf, fuse_lora="False")


def test_a_model_without_layers_is_refused_naming_the_config():
    """A valid 0-layer transformers Llama (its forward runs) failed in from_hf with a bare "IndexError: index 0 is
    out of range" from nn.ModuleList (configs hunt); it is refused naming num_hidden_layers."""
    with pytest.raises(ValueError, match="num_hidden_layers=0"):
        build(num_hidden_layers=0)


# ---------------------------------------------------------------- decode graphs


def _same_state(a: PagedKVCache, b: PagedKVCache, exact: bool) -> None:
    for name in ("block_table", "seq_lens", "page_refcount", "free_stack", "free_top"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("k_pages", "v_pages"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-5, atol=1e-5), name


@pytest.mark.parametrize("device", DEVICES)
def test_decode_graphs_replay_the_eager_step(device):
    """model.decode_graphs against model.forward_packed on a twin cache, through a rollback, a fork in
    the middle of a page (copy-on-write before the first write), a batch of 4 (a second graph) and a
    subset with its tokens on the device (a third). On the CPU the step runs the same ops eagerly: logits
    and the whole cache bit-identical. On the GPU it replays captured graphs: cuBLAS and Triton in a
    replay, checked against the eager step within float32 tolerance, and everything against
    transformers' forward on each full sequence."""
    hf, model = build(device)
    prompts = [rand_tokens(n) for n in (5, 2, 9)]
    eager, graphed = (model.new_cache(page_size=4, num_pages=32, max_seqs=5) for _ in range(2))
    ids = [[c.add_sequence() for _ in prompts] for c in (eager, graphed)][0]
    for c in (eager, graphed):
        model(prompts, ids, c)
    step = model.decode_graphs(graphed, max_len=24)
    seqs = dict(zip(ids, prompts, strict=True))  # every sequence's tokens, to check against transformers
    exact = device == "cpu"

    def both(sel: list[int], toks: torch.Tensor) -> torch.Tensor:
        a = model.forward_packed(toks, [1] * len(sel), sel, eager)
        b = step(toks, sel)
        assert b.shape == (len(sel), VOCAB) and b.dtype == torch.float32 and b.device == a.device
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        _same_state(eager, graphed, exact)
        for s, t in zip(sel, toks.tolist(), strict=True):
            seqs[s] = torch.cat([seqs[s], torch.tensor([t])])
        return b

    last = None
    for _ in range(3):
        last = both(ids, rand_tokens(3) if last is None else last.argmax(-1).cpu())
    for c in (eager, graphed):
        c.rollback([ids[2]], [6])
    seqs[ids[2]] = seqs[ids[2]][:6]
    child = [c.fork(ids[0], 6) for c in (eager, graphed)][0]  # length 8: the fork shares a half-filled page
    seqs[child] = seqs[ids[0]][:6]
    batch = [*ids, child]
    for _ in range(3):
        last = both(batch, rand_tokens(4))
    pair = [ids[1], child]
    for _ in range(2):
        last = both(pair, rand_tokens(2).to(device))
    assert [graphed.length(s) for s in batch] == [len(seqs[s]) for s in batch]
    assert (step.captures, step.eager_calls) == ((3, 0) if device == "cuda" else (0, 0))
    for s, row in zip(pair, last, strict=True):
        assert_close(row[None], hf_logits(hf, seqs[s])[-1:], torch.float32, f"sequence {s}")


@pytest.mark.parametrize("device", DEVICES)
def test_steps_under_inference_mode_equal_those_under_no_grad(device):
    """Prefill and decode under torch.inference_mode(), with the sequence ids as a list or as an inference
    tensor, give no_grad's logits bit for bit (every step with a layer raised there: the attention's
    per-step memo read the ids' version counter, which inference tensors lack; bug hunt)."""
    _, model = build(device)
    prompts = [rand_tokens(5), rand_tokens(3)]
    outs = []
    for mode in (torch.no_grad, torch.inference_mode, torch.inference_mode):
        cache = model.new_cache(page_size=4, num_pages=32, max_seqs=2)
        with mode():
            ids = [cache.add_sequence() for _ in range(2)]
            if len(outs) == 2:  # the third run: a tensor made in inference mode
                ids = torch.tensor(ids)
            first = model(prompts, ids, cache)
            nxt = model([o[-1:].argmax(-1).cpu() for o in first], ids, cache)
        outs.append([*first, *nxt])
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_decode_graphs_captured_in_inference_mode_replay_outside_it():
    """A step captured under torch.inference_mode() replays under torch.no_grad(): its static input,
    made as an inference tensor, refused the copy into it there (review 2026-12-04); and a cache made
    under inference_mode serves steps outside it."""
    _, model = build("cuda")
    with torch.inference_mode():
        cache = model.new_cache(page_size=4, num_pages=32, max_seqs=3)
    ids = [cache.add_sequence() for _ in range(2)]
    model([rand_tokens(5), rand_tokens(3)], ids, cache)
    step = model.decode_graphs(cache, max_len=16)
    with torch.inference_mode():
        first = step(rand_tokens(2), ids)
    second = step(first.argmax(-1).cpu(), ids)
    assert step.captures == 1 and second.shape == (2, VOCAB) and [cache.length(s) for s in ids] == [7, 5]


def test_decode_graphs_bad_input_raises_and_leaves_the_cache_unchanged(monkeypatch):
    hf, model = build()
    cache = model.new_cache(page_size=4, num_pages=4, max_seqs=3)
    ids = [cache.add_sequence() for _ in range(2)]
    model([rand_tokens(4), rand_tokens(3)], ids, cache)
    step = model.decode_graphs(cache, max_len=5)

    def state():
        return ([cache.length(s) for s in ids], cache.stats(), cache.block_table.clone(), cache.k_pages.clone())

    def unchanged(before):
        after = state()
        assert after[:2] == before[:2] and torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])

    before = state()
    for args, exc, match in [
        ((rand_tokens(1), ids), ValueError, "tokens has 1 entries; seq_ids has 2"),
        ((rand_tokens(2).int(), ids), TypeError, "tokens must be a 1-D int64"),
        ((torch.tensor([0, VOCAB]), ids), ValueError, "tokens holds ids outside"),
        ((rand_tokens(2), [ids[0], 2]), ValueError, "seq_ids"),  # not active: the cache's own error
        ((rand_tokens(2), [ids[0], ids[0]]), ValueError, "seq_ids"),
    ]:
        with pytest.raises(exc, match=match):
            step(*args)
        unchanged(before)
    # Pool exhausted: sequence 0 fills its page (4 tokens) and needs a new one; 2 of 4 pages are left,
    # so take them with a third sequence first.
    third = cache.add_sequence()
    model([rand_tokens(8)], [third], cache)
    before = state()
    with pytest.raises(ValueError, match="pool exhausted"):
        step(rand_tokens(2), ids)
    unchanged(before)
    cache.free(third)
    # An error in the middle of the step (layer 1's attention) aborts it: lengths and pages as before.
    real = llama_mod.paged_decode_attention_op

    def failing(q, k_pages, v_pages, block_table, layer, *args):
        if layer == 1:
            raise RuntimeError("injected")
        return real(q, k_pages, v_pages, block_table, layer, *args)

    before = state()
    monkeypatch.setattr(llama_mod, "paged_decode_attention_op", failing)
    with pytest.raises(RuntimeError, match="injected"):
        step(rand_tokens(2), ids)
    monkeypatch.undo()
    assert state()[:2] == before[:2]  # (the aborted step's K/V stay in slots past the lengths)
    step(rand_tokens(2), ids)  # 5 and 4 tokens: max_len reached by sequence 0
    with pytest.raises(ValueError, match=f"sequence {ids[0]} would reach 6 tokens.*max_len=5"):
        step(rand_tokens(2), ids)
    assert step(torch.zeros(0, dtype=torch.int64), []).shape == (0, VOCAB)
    # An open step is the caller's: refused, left open.
    kv = torch.zeros(1, cache.num_kv_heads, cache.head_dim)
    cache.append(0, [ids[1]], kv, kv)
    with pytest.raises(ValueError, match="a step is open"):
        step(rand_tokens(1), [ids[1]])
    cache.abort_step()
    for kwargs, exc, match in [({"max_len": 0}, ValueError, r"max_len must be an int in \[1, 16\]"),
                               ({"max_len": 17}, ValueError, "max_len"), ({"max_len": 4.0}, ValueError, "max_len")]:
        with pytest.raises(exc, match=match):
            model.decode_graphs(cache, **kwargs)
    with pytest.raises(TypeError, match="cache must be a kfuse.kv.PagedKVCache"):
        model.decode_graphs(object())
    _, dyn = build(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        dyn.decode_graphs(dyn.new_cache(page_size=4, num_pages=4, max_seqs=1))


def test_a_step_interrupted_as_the_cache_commits_it_leaves_the_cache_as_it_was(monkeypatch):
    """An interrupt raised as the cache's host state advanced the lengths (kv.py's advance): forward_packed
    and the decode graphs' step raised with the step committed (abort_step keeps a committed step), so a retry
    fed the tokens twice (logits 7 off). Raised as the decode step opened its step, the step stayed open and
    every later call was refused (process hunt, 2026-12-07). Now either raises with the cache as it was, and
    the retry gives the uninterrupted call's logits."""
    hf, model = build()
    prompts, nxt = [rand_tokens(5), rand_tokens(3)], rand_tokens(2)

    def fresh():
        cache = model.new_cache(page_size=4, num_pages=16, max_seqs=3)
        ids = [cache.add_sequence() for _ in prompts]
        model(prompts, ids, cache)
        return cache, ids

    cache, ids = fresh()
    want = model.forward_packed(nxt, [1, 1], ids, cache)
    for where, target in (("forward", "_host"), ("decode graphs", "_host"), ("decode graphs", "_open_step")):
        cache, ids = fresh()
        before = ([cache.length(s) for s in ids], cache.stats())
        step = model.decode_graphs(cache, max_len=8) if where == "decode graphs" else None
        with monkeypatch.context() as m:
            m.setattr(cache, target, RaisesAfter(cache._host, "advance") if target == "_host" else
                      RaisesAfter(cache, "_open_step")._open_step)
            with pytest.raises(KeyboardInterrupt):
                model.forward_packed(nxt, [1, 1], ids, cache) if step is None else step(nxt, ids)
        assert cache._step is None and ([cache.length(s) for s in ids], cache.stats()) == before, (where, target)
        got = model.forward_packed(nxt, [1, 1], ids, cache) if step is None else step(nxt, ids)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_decode_graph_body_never_mixes_host_and_device_tensors(monkeypatch):
    """What a capture records (DecodeGraphs._body), run on fake CUDA tensors (no GPU needed): no aten op
    takes a CPU tensor beside a CUDA one (a capture refuses such a copy; a rotary table or a position
    left on the host would be one)."""
    from fake_cuda import MixedDevices, fake_cuda_device_state  # noqa: PLC0415
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    from kfuse import _backends  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cache = PagedKVCache(2, 2, 16, 4, 8, 3, _mirror=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with torch.device("cuda"):
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
        model = LlamaForCausalLM.from_hf(hf)
        fake_cuda_device_state(cache)
        # The interpreter (these tests' setting) cannot be captured: refused, naming it.
        monkeypatch.setattr(_backends, "triton_interpret", lambda: True)
        with pytest.raises(ValueError, match="compiled Triton decode kernel: .*TRITON_INTERPRET"):
            model.decode_graphs(cache)
        monkeypatch.setattr(_backends, "triton_interpret", lambda: False)
        import kfuse.triton_kernels  # noqa: PLC0415

        monkeypatch.setattr(kfuse.triton_kernels, "INTERPRETED", False)  # as kernels loaded on a GPU machine
        graphs = model.decode_graphs(cache)
        meta = torch.zeros(5, 3, dtype=torch.int64, device="cuda")
        with MixedDevices() as log:
            out = graphs._body(meta)
    assert out.shape == (3, VOCAB) and out.device.type == "cuda"
    assert "kfuse.paged_decode_attention.default" in log.ops and not log.mixed, log.mixed
