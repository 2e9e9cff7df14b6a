"""LoRA's claims end to end (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022), small:
``python -m kfuse.demos.lora_finetune [--small]``.

1. A tiny GPT-2 (``transformers``' ``GPT2LMHeadModel`` built from a config, words as tokens) is pretrained on
   English text that ships with Python (the documentation's topics, ``pydoc_data.topics``) and on sentences
   about restaurants (:func:`pretrain`).
2. The paper's GPT-2 task in miniature: E2E-NLG-style data-to-text (a restaurant's meaning representation, e.g.
   ``name[The Red Fork], eatType[pub], food[Italian], area[riverside]``, to a sentence). The data are
   synthetic (the sentences come from templates: :func:`describe`), so every output can be scored exactly;
   the test split's restaurant names are combinations never seen in training (the model must copy them).
3. The same pretrained model is fine-tuned on the same batches five ways: every weight (full fine-tuning);
   PEFT's LoRA (r = 4 on every ``Conv1D``: attention and MLP) on PEFT's own layers; the same on kfuse
   (``kfuse.integrations.peft.fuse``); and r = 1 and r = 16 on kfuse. Printed: trainable parameters, test loss,
   and greedy outputs scored by exact match and slot recall (the share of the input's slot values the output
   states), and the median training step's time.
4. The kfuse adapter is merged into the base weights (``merge_adapter``): the merged model's logits must equal
   the adapted model's, and its forward costs what the base model's does (the paper's "no added inference
   latency"), timed against the unmerged fused model.
5. Serving several adapters at once: a second adapter is trained for another style (:func:`advertise`); one
   batch mixing rows for each adapter and for the base model runs through PEFT's ``adapter_names=`` on
   kfuse's multi-adapter kernel (``kfuse.lora_linear_multi``), and each row's output is checked against that
   adapter alone.

``--small`` runs a smaller model and fewer steps in well under a minute (it shows the pipeline, not the
claims). float32 on the CPU (``--device cuda`` when present). Nothing is downloaded: the text ships with
Python, ``transformers`` and ``peft`` are demo dependencies (not kfuse's).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import re
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kfuse.demos._args import check_device, check_outputs, positive, rng_seed, threads
from kfuse.demos._train import train_lm

__all__ = ["SLOTS", "WordTokenizer", "Run", "advertise", "describe", "main", "meaning", "restaurants", "slot_recall"]

# ---------------------------------------------------------------- the data: E2E-style restaurants

_ADJ = ("Red", "Blue", "Golden", "Silver", "Green", "Old", "Little", "Royal", "Wild", "Black")
_NOUN = ("Fork", "Eagle", "Lion", "Mill", "Spoon", "Rose", "Oak", "Dragon", "Plough", "Bell")
#: The optional slots and their values (``name`` and ``eatType`` are always given), as in the E2E dataset
#: (Novikova et al., 2017; its price and rating values are words here, all ASCII).
SLOTS = {
    "food": ("English", "French", "Italian", "Indian", "Chinese", "Japanese", "fast food"),
    "priceRange": ("cheap", "moderate", "expensive"),
    "customerRating": ("low", "average", "high"),
    "area": ("city centre", "riverside"),
    "familyFriendly": ("yes", "no"),
    "near": (),  # another restaurant's name
}
_EAT = ("restaurant", "coffee shop", "pub")


def restaurants(n: int, *, test: bool, seed: int) -> list[dict[str, str]]:
    """``n`` random meaning representations (slot -> value). Names are "The <adjective> <noun>": the test split
    uses the 20 combinations with (adjective index + noun index) % 5 == 0, the training split the other 80, so
    every word of a test name is seen in training, never the name itself."""
    g = torch.Generator().manual_seed(seed)
    names = [f"The {a} {b}" for i, a in enumerate(_ADJ) for j, b in enumerate(_NOUN) if ((i + j) % 5 == 0) == test]
    others = [f"The {a} {b}" for a in _ADJ for b in _NOUN]

    def pick(values: Sequence[str]) -> str:
        return values[int(torch.randint(len(values), (), generator=g))]

    out = []
    for _ in range(n):
        mr = {"name": pick(names), "eatType": pick(_EAT)}
        for slot, values in SLOTS.items():
            if float(torch.rand((), generator=g)) < 0.5:
                mr[slot] = pick(values or [o for o in others if o != mr["name"]])
        out.append(mr)
    return out


def meaning(mr: dict[str, str]) -> str:
    """The E2E dataset's textual form: ``name[The Red Fork], eatType[pub], ...``."""
    return ", ".join(f"{k}[{v}]" for k, v in mr.items())


def _phrases(mr: dict[str, str]) -> tuple[str, str, str]:
    """(what it is: "a cheap Italian pub in the city centre near The Old Mill", the rating/family clause
    "rated high and family friendly" or "", the name)."""
    kind = " ".join(v for v in (mr.get("priceRange"), mr.get("food"), mr["eatType"]) if v)
    kind = ("an " if kind[0].lower() in "aeiou" else "a ") + kind
    if "area" in mr:
        kind += " in the city centre" if mr["area"] == "city centre" else " by the riverside"
    if "near" in mr:
        kind += f" near {mr['near']}"
    extra = []
    if "customerRating" in mr:
        extra.append(f"rated {mr['customerRating']}")
    if "familyFriendly" in mr:
        extra.append("family friendly" if mr["familyFriendly"] == "yes" else "not family friendly")
    return kind, " and ".join(extra), mr["name"]


def describe(mr: dict[str, str]) -> str:
    """The first task's sentence: "The Red Fork is a cheap Italian pub by the riverside. It is rated high."."""
    kind, extra, name = _phrases(mr)
    return f"{name} is {kind}." + (f" It is {extra}." if extra else "")


def advertise(mr: dict[str, str]) -> str:
    """The second task's (the second adapter's) sentence: "Looking for a cheap Italian pub by the riverside?
    Try The Red Fork, rated high!"."""
    kind, extra, name = _phrases(mr)
    return f"Looking for {kind}? Try {name}" + (f", {extra}!" if extra else "!")


def slot_recall(mr: dict[str, str], text: str) -> float:
    """The share of ``mr``'s slot values that ``text`` states, by the phrases both tasks use (a "yes"
    familyFriendly counts only without "not family friendly")."""
    kind, extra, name = _phrases(mr)
    want = [name, mr["eatType"]] + [mr[s] for s in ("food", "priceRange", "near") if s in mr]
    if "area" in mr:
        want.append("city centre" if mr["area"] == "city centre" else "riverside")
    if "customerRating" in mr:
        want.append(f"rated {mr['customerRating']}")
    hits = sum(w in text for w in want)
    if "familyFriendly" in mr:
        fam = "not family friendly" in text if mr["familyFriendly"] == "no" else (
            "family friendly" in text and "not family friendly" not in text)
        want.append("familyFriendly")
        hits += fam
    return hits / len(want)


def corpus() -> str:
    """The pretraining text: the Python documentation's topics (``pydoc_data.topics``, ships with CPython)."""
    from pydoc_data.topics import topics  # noqa: PLC0415

    return " ".join(topics[k] for k in sorted(topics))


_WORD = re.compile(r"[A-Za-z]+|[^\sA-Za-z]")


class WordTokenizer:
    """Words (case kept) and single other characters as tokens over a fixed vocabulary: 0 is padding, 1 the end
    of a text, 2 unknown, 3 the separator between a meaning representation and its text, then every word the
    tasks use (so nothing of theirs is unknown), then the ``size`` most frequent tokens of ``corpus``.
    ``decode`` puts no space before ``. , ! ? [ ]`` nor after ``[``, so the tasks' texts round-trip exactly."""

    pad, eos, unk, sep = 0, 1, 2, 3

    def __init__(self, corpus: str, size: int = 2048) -> None:
        # every slot's every value in both tasks, with and without the optional clauses
        full = {"name": "The Red Fork", "eatType": "pub"}
        full |= {k: v[0] if v else "The Old Mill" for k, v in SLOTS.items()}
        mrs = [{"name": f"The {a} {n}", "eatType": e} for a, n, e in zip(_ADJ, _NOUN, _EAT * 4, strict=False)]
        mrs += [full | {k: v} for k, vs in SLOTS.items() for v in vs]
        texts = [f(mr) for mr in mrs for f in (meaning, describe, advertise)]
        task_words = _WORD.findall(" ".join(texts + [f"The {a} {n}" for a in _ADJ for n in _NOUN]))
        words = list(dict.fromkeys(task_words))
        known = set(words)
        words += [w for w, _ in Counter(_WORD.findall(corpus)).most_common(size) if w not in known]
        self.vocab = ["<pad>", "\n", "<unk>", " => ", *words]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk) for w in _WORD.findall(text)]

    def decode(self, ids: Sequence[int]) -> str:
        text = " ".join(self.vocab[i] for i in ids if i != self.pad)
        return re.sub(r" ([.,!?\[\]])", r"\1", text).replace("[ ", "[")


def _examples(tok: WordTokenizer, mrs: list[dict[str, str]], task: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt ids ending with the separator, target ids ending with eos) per meaning representation."""
    return [(tok.encode(meaning(mr)) + [tok.sep], tok.encode(task(mr)) + [tok.eos]) for mr in mrs]


def _batch(tok: WordTokenizer, pairs: list[tuple[list[int], list[int]]], device: str) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (the target only: -100 elsewhere)."""
    n = max(len(p) + len(t) for p, t in pairs)
    ids = torch.full((len(pairs), n), tok.pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, t) in enumerate(pairs):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p): len(p) + len(t)] = torch.tensor(t)
        mask[i, : len(p) + len(t)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# ---------------------------------------------------------------- the model and its training


@dataclass
class Size:
    """The model and schedule of a run (``--small`` or the default)."""

    n_embd: int = 128
    n_layer: int = 4
    pretrain_steps: int = 600
    finetune_steps: int = 300
    batch: int = 32
    seq: int = 64
    test: int = 256
    generate: int = 64


_SMALL = Size(n_embd=48, n_layer=2, pretrain_steps=40, finetune_steps=30, batch=8, seq=32, test=32, generate=8)


def _config(tok: WordTokenizer, size: Size) -> Any:
    from transformers import GPT2Config  # noqa: PLC0415 (a demo dependency)

    # no dropout in the base model: the runs differ only by what they train (the adapters' own dropout aside)
    return GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=size.n_embd, n_layer=size.n_layer, n_head=4,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.eos,
                      eos_token_id=tok.eos, pad_token_id=tok.pad)


def pretrain(tok: WordTokenizer, size: Size, *, seed: int, device: str, progress: bool = True) -> Any:
    """The base model: a ``GPT2LMHeadModel`` trained from scratch (AdamW, lr 3e-3) on random ``size.seq``-token
    windows of :func:`corpus` followed by 3,000 sentences of both tasks about training-split restaurants, without
    their meaning representations: the model knows the domain's words (their output embeddings are trained, which
    LoRA cannot do), as GPT-2 knows English, but not the task (pretraining on the Python text alone left LoRA
    unable to emit the restaurant words, whose tied embeddings stayed at their random initialisation)."""
    from transformers import GPT2LMHeadModel  # noqa: PLC0415

    mrs = restaurants(3000, test=False, seed=seed + 2)
    sentences = " ".join((describe if i % 2 else advertise)(mr) for i, mr in enumerate(mrs))
    text = torch.tensor(tok.encode(corpus() + " " + sentences))
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(_config(tok, size)).to(device)
    g = torch.Generator().manual_seed(seed)

    def window(step: int) -> dict[str, Tensor]:
        x = text[torch.randint(len(text) - size.seq, (size.batch, 1), generator=g) + torch.arange(size.seq)]
        return {"input_ids": x.to(device), "labels": x.to(device)}

    train_lm(model, model.parameters(), window, steps=size.pretrain_steps, lr=3e-3, label="pretrain",
             progress=progress)
    return model


def _lora_config(r: int, dropout: float) -> Any:
    from peft import LoraConfig  # noqa: PLC0415 (a demo dependency)

    # every Conv1D of GPT-2 (c_attn, both c_proj, c_fc); alpha = 2r keeps the scaling at 2 for every rank
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True)


@dataclass
class Run:
    """One fine-tuning run's figures."""

    name: str
    trainable: int
    test_loss: float
    exact: float
    slots: float
    ms_per_step: float


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT's warnings about the tiny model's config, and the deprecations PEFT's calls into ``transformers``
    raise (their business, not the demo's reader's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="peft")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def adapt(base: Any, r: int, *, dropout: float, fused: bool, seed: int) -> Any:
    """A PEFT model around a copy of ``base`` with a rank-``r`` LoRA adapter named ``"default"`` (initialised from
    ``seed``), on kfuse's kernels when ``fused``."""
    from peft import get_peft_model  # noqa: PLC0415

    from kfuse.integrations.peft import fuse  # noqa: PLC0415

    torch.manual_seed(seed)
    with _quiet_peft():
        model = get_peft_model(copy.deepcopy(base), _lora_config(r, dropout))
    if fused:
        report = fuse(model)
        if report.skipped:
            raise RuntimeError(f"kfuse did not fuse every LoRA layer: {report}")
    return model


def finetune(model: Any, tok: WordTokenizer, train: list[tuple[list[int], list[int]]], size: Size, *, lr: float,
             seed: int, device: str, label: str, progress: bool = True) -> list[float]:
    """Train ``model``'s trainable parameters on random batches of ``train`` (the same batches for a given
    ``seed``); returns each step's seconds."""
    g = torch.Generator().manual_seed(seed)

    def batch(step: int) -> dict[str, Tensor]:
        rows = torch.randint(len(train), (size.batch,), generator=g).tolist()
        return _batch(tok, [train[i] for i in rows], device)

    return train_lm(model, model.parameters(), batch, steps=size.finetune_steps, lr=lr, warmup=10, label=label,
                    progress=progress)


@torch.no_grad()
def test_loss(model: Any, tok: WordTokenizer, test: list[tuple[list[int], list[int]]], device: str) -> float:
    """Mean cross-entropy per target token over ``test`` (teacher forcing)."""
    total, count = 0.0, 0
    for i in range(0, len(test), 64):
        b = _batch(tok, test[i: i + 64], device)
        n = int((b["labels"][:, 1:] != -100).sum())
        total += float(model(**b).loss) * n
        count += n
    return total / count


@torch.no_grad()
def generate(model: Any, tok: WordTokenizer, prompts: list[list[int]], device: str, **kwargs: Any) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded into one batch) up to the end of the text (or 64
    tokens); ``kwargs`` go to ``generate`` (``adapter_names=``)."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), tok.pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p)
        mask[i, n - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=64,
                         do_sample=False, pad_token_id=tok.pad, eos_token_id=tok.eos, **kwargs)
    rows = out[:, n:].tolist()
    return [tok.decode(row[: row.index(tok.eos)] if tok.eos in row else row) for row in rows]


def score(model: Any, tok: WordTokenizer, mrs: list[dict[str, str]], task: Any, device: str) -> tuple[float, float]:
    """(exact-match rate, mean slot recall) of ``model``'s greedy outputs for ``mrs`` on ``task``."""
    outs = generate(model, tok, [tok.encode(meaning(mr)) + [tok.sep] for mr in mrs], device)
    exact = sum(o == task(mr) for o, mr in zip(outs, mrs, strict=True)) / len(mrs)
    return exact, statistics.fmean(slot_recall(mr, o) for o, mr in zip(outs, mrs, strict=True))


def _trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _forward_ms(model: Any, batch: dict[str, Tensor], repeats: int = 20) -> float:
    """Median ms of an inference forward over ``batch``."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            t0 = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if batch["input_ids"].is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[3:])


# ---------------------------------------------------------------- the command line


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: pretrain, fine-tune five ways, merge, serve two adapters; print the figures. Returns them
    (``base_test_loss``: the pretrained model's; ``runs``: a :class:`Run` per fine-tuning; ``merge`` and ``serve``:
    dicts)."""
    ap = argparse.ArgumentParser(prog="python -m kfuse.demos.lora_finetune", description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a smaller model and fewer steps (under a minute)")
    ap.add_argument("--steps", type=positive(int), default=None,
                    help="fine-tuning steps per run (300; 30 with --small)")
    ap.add_argument("--pretrain-steps", type=positive(int), default=None,
                    help="pretraining steps (600; 40 with --small)")
    ap.add_argument("--lr", type=positive(float), default=1e-2, help="LoRA's learning rate")
    ap.add_argument("--full-lr", type=positive(float), default=1e-3, help="full fine-tuning's learning rate")
    ap.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (the paper's 0.1)")
    ap.add_argument("--seed", type=rng_seed, default=0)
    ap.add_argument("--threads", type=threads, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", help="save the figures here as JSON")
    args = ap.parse_args(argv)
    if not 0 <= args.dropout < 1:
        ap.error(f"--dropout must be in [0, 1); got {args.dropout}")
    check_device(ap, "device", args.device)
    check_outputs(ap, json=args.json)
    try:
        import peft  # noqa: F401, PLC0415
    except ImportError:
        ap.error("this demo needs `peft` and `transformers` (pip install peft)")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = dataclasses.replace(_SMALL if args.small else Size())
    size.finetune_steps = args.steps or size.finetune_steps
    size.pretrain_steps = args.pretrain_steps or size.pretrain_steps
    dev, tok, seed = args.device, WordTokenizer(corpus()), args.seed

    print(f"pretraining a GPT-2 ({size.n_layer} layers, width {size.n_embd}) on the Python documentation "
          f"({size.pretrain_steps} steps)", file=sys.stderr, flush=True)
    base = pretrain(tok, size, seed=seed, device=dev)
    train_mrs = restaurants(2000, test=False, seed=seed)
    test_mrs = restaurants(size.test, test=True, seed=seed + 1)
    train, test = _examples(tok, train_mrs, describe), _examples(tok, test_mrs, describe)
    shown = test_mrs[: size.generate]

    base_loss = test_loss(base, tok, test, dev)
    runs: list[Run] = []
    models: dict[str, Any] = {}
    plan = [("full fine-tuning", None, False), ("PEFT LoRA r=4", 4, False), ("kfuse LoRA r=4", 4, True),
            ("kfuse LoRA r=1", 1, True), ("kfuse LoRA r=16", 16, True)]
    for name, r, on_kfuse in plan:
        model = copy.deepcopy(base) if r is None else adapt(base, r, dropout=args.dropout, fused=on_kfuse, seed=seed)
        seconds = finetune(model, tok, train, size, lr=args.full_lr if r is None else args.lr, seed=seed,
                           device=dev, label=name)
        exact, slots = score(model, tok, shown, describe, dev)
        runs.append(Run(name, _trainable(model), test_loss(model, tok, test, dev), exact, slots,
                        1e3 * statistics.median(seconds[min(5, len(seconds) - 1):])))
        models[name] = model
    print(f"\nE2E-style data-to-text, {size.finetune_steps} steps of {size.batch}; test: {len(test)} examples with "
          f"unseen names, {len(shown)} generated greedily")
    print(f"{'run':<18} {'trainable':>10} {'test loss':>10} {'exact':>6} {'slots':>6} {'ms/step':>8}")
    print(f"{'(not fine-tuned)':<18} {0:>10,} {base_loss:>10.4f}")
    for run in runs:
        print(f"{run.name:<18} {run.trainable:>10,} {run.test_loss:>10.4f} {run.exact:>6.2f} {run.slots:>6.2f} "
              f"{run.ms_per_step:>8.1f}")

    # merging: the same function, the base model's cost
    fused = models["kfuse LoRA r=4"]
    batch = _batch(tok, test[:16], dev)
    with torch.no_grad():
        before = fused(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ms_adapted = _forward_ms(fused, batch)
        fused.merge_adapter()
        after = fused(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ms_merged = _forward_ms(fused, batch)
        fused.unmerge_adapter()
    ms_base = _forward_ms(base, batch)
    merge = {"max_abs_logit_diff": float((before - after).abs().max()), "ms_base": ms_base,
             "ms_adapted": ms_adapted, "ms_merged": ms_merged}
    print(f"\nmerged into the base weights: logits within {merge['max_abs_logit_diff']:.1e} of the adapted model's; "
          f"inference forward (16 examples) {ms_merged:.2f} ms merged, {ms_adapted:.2f} ms adapted (kfuse), "
          f"{ms_base:.2f} ms the base model")

    # serving: a second adapter on the same base, one batch mixing both and the base
    with _quiet_peft():  # the fused layers serve the new adapter too: they read PEFT's state at every call
        fused.add_adapter("advertise", _lora_config(4, args.dropout))
    fused.set_adapter("advertise")
    finetune(fused, tok, _examples(tok, train_mrs, advertise), size, lr=args.lr, seed=seed + 1, device=dev,
             label="advertise adapter")
    tasks = {"default": describe, "advertise": advertise}
    names = [("default", "advertise", "__base__")[i % 3] for i in range(len(shown))]
    prompts = [tok.encode(meaning(mr)) + [tok.sep] for mr in shown]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed = generate(fused, tok, prompts, dev, adapter_names=names)
    fallbacks = sorted({str(w.message) for w in caught if "kfuse" in str(w.message)})
    alone: list[str] = []
    for i, name in enumerate(names):
        if name == "__base__":
            with fused.disable_adapter():
                alone += generate(fused, tok, prompts[i: i + 1], dev)
        else:
            fused.set_adapter(name)
            alone += generate(fused, tok, prompts[i: i + 1], dev)
    serve = {"rows": len(names), "equal_to_alone": sum(a == b for a, b in zip(mixed, alone, strict=True)),
             "fallbacks": fallbacks,
             "exact": {n: statistics.fmean(o == tasks[n](mr) for o, mr, m in zip(mixed, shown, names, strict=True)
                                           if m == n) for n in tasks if n in names}}
    print(f"\nserving one batch of {len(names)} rows over two adapters and the base (adapter_names=, "
          f"kfuse.lora_linear_multi{'' if not fallbacks else '; FELL BACK TO PEFT: ' + '; '.join(fallbacks)}): "
          f"{serve['equal_to_alone']}/{len(names)} rows equal to their adapter alone; exact match "
          + ", ".join(f"{n} {v:.2f}" for n, v in serve["exact"].items()))
    for i in range(min(3, len(names))):
        print(f"  [{names[i]}] {meaning(shown[i])}\n      -> {mixed[i]}")
    result = {"size": dataclasses.asdict(size), "base_test_loss": base_loss, "runs": runs, "merge": merge,
              "serve": serve}
    if args.json:
        from kfuse._files import write_json  # noqa: PLC0415

        write_json(args.json, {**result, "runs": [dataclasses.asdict(r) for r in runs]})
    return result


if __name__ == "__main__":
    main()
