"""The medical-code model end to end (Wallis et al., "Learning Semantic Relationships from Medical Codes"):
``python -m kfuse.demos.medical_codes [--small] [--out medical_codes.png]``.

1. Loads the real code lists (74,044 ICD-10-CM diagnoses with CCSR categories, 78,603 ICD-10-PCS
   procedures with CCS categories; a synthetic drug vocabulary, clearly labelled) and generates
   synthetic claims on them (:mod:`kfuse.data.claims`: Zipf frequencies, latent conditions, an
   admission outcome with a known rule).
2. Trains the general embedding (CBOW with negative sampling over each visit's codes) on kfuse's
   multi-table embedding bags with the fused row-wise Adagrad.
3. Prints the nearest neighbours of a few well-known codes (I10 hypertension, E11.9 type 2
   diabetes, I50.9 heart failure, J44.9 COPD, ...; those seen often enough), and how often a code's 5 nearest
   neighbours share its category against chance.
4. Trains the admission task with the general, task-specific and super embeddings over several seeds
   (patient split and task initialisation) and prints the test AUC with a 95 % t-interval.
5. Times the general embedding's training step on kfuse against the same model on a per-table
   ``torch.nn.EmbeddingBag`` loop (sparse gradients + ``torch.optim.Adagrad``) and on FBGEMM's CPU op
   (``EXACT_ROWWISE_ADAGRAD``): the same batches, the builds' steps interleaved, codes/s of the
   median step (forward, backward, optimizer; batch assembly excluded).
6. Saves a PNG (AUC with intervals; neighbour agreement; throughput).

``--claims my.csv`` runs the same on your own claims (:func:`kfuse.data.read_claims_csv`; the task
needs its ``label`` column; ``--skip-unknown`` drops rows whose code is not in the lists).

``--small`` runs a 60-category subset at D = 32 in well under a minute. CUDA is used when present
(kfuse's Triton backend; the FBGEMM row is CPU-only and skipped there).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kfuse.data.claims import Claims, ClaimsConfig, load_code_vocab, read_claims_csv, synthetic_claims, zipf_slope
from kfuse.demos._args import check_device, check_figures, count, figure_path, positive, rng_seed
from kfuse.nn.code_embedding import (
    IMPLS,
    CodeOutcomeModel,
    GeneralCodeEmbedding,
    cbow_batch,
    neighbour_agreement,
    predict_outcome,
    train_general,
    train_outcome,
)
from kfuse.ops.embedding import backend_reasons

#: Well-known diagnosis codes whose nearest neighbours are shown (when seen often enough).
FAMOUS = {"I10": "hypertension", "E119": "type 2 diabetes", "I509": "heart failure", "J449": "COPD",
          "F329": "depression", "N186": "end-stage renal disease"}
# t quantiles (0.975) for 95 % intervals over n seeds (n − 1 degrees of freedom).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def log(msg: str) -> None:
    print(msg, flush=True)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by ranks (ties averaged)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = np.asarray(scores)[order]
    i = 0
    while i < len(s):  # average ranks of ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return math.nan
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _t975(df: int) -> float:
    """Student's t 0.975 quantile: the table to 9 degrees of freedom, then the Cornish-Fisher expansion
    around the normal's 1.96 (within 3e-4 from 10 on; the normal alone is 12 % short at 10)."""
    if df in _T975:
        return _T975[df]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), _t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kfuse.demos.medical_codes",
                                description="The medical-code model end to end (Wallis et al., \"Learning Semantic "
                                "Relationships from Medical Codes\") on the real code lists and synthetic claims.")
    p.add_argument("--small", action="store_true", help="a 60-category subset (with --claims: the whole lists and the "
                   "default drug list), D=32, 3000 patients")
    p.add_argument("--dim", type=positive(int), default=None, help="embedding dimension (128; 32 with --small)")
    p.add_argument("--patients", type=positive(int), default=None,
                   help="synthetic patients (20000; 3000 with --small)")
    p.add_argument("--epochs", type=positive(float), default=None,
                   help="general-embedding epochs (2; 3 with --small)")
    p.add_argument("--task-epochs", type=positive(int), default=None, help="task epochs (3; 5 with --small)")
    p.add_argument("--seeds", type=count, default=3, help="seeds for the AUC intervals (0: no task)")
    p.add_argument("--bench-seconds", type=positive(float), default=None,
                   help="time per build in the throughput race")
    p.add_argument("--out", default="medical_codes.png", help="the PNG written")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--claims", default=None, help="your own claims CSV (patient,visit,code,domain[,label]; codes "
                   "from the real lists, drugs from the default synthetic one, whatever --seed and --small) "
                   "instead of the synthetic claims")
    p.add_argument("--skip-unknown", action="store_true",
                   help="with --claims: drop rows whose code is not in the lists (default: an error naming the line)")
    p.add_argument("--seed", type=rng_seed, default=0,
                   help="of the synthetic claims and drug list, the training, the task's splits (default 0)")
    a = p.parse_args(argv)
    # What would otherwise fail after the whole run (or deep inside it): refused up front.
    check_figures(p, out=a.out)
    if a.claims is not None and not Path(a.claims).is_file():
        p.error(f"--claims: no such file: {a.claims}")
    check_device(p, "device", a.device)
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    small = a.small
    def given(v: object, default: object) -> object:  # not `v or default`: an explicit value is never replaced
        return default if v is None else v

    dim = given(a.dim, 32 if small else 128)
    patients = given(a.patients, 3000 if small else 20_000)
    epochs = given(a.epochs, 3.0 if small else 2.0)
    batch = 256 if small else 1024
    bench_s = given(a.bench_seconds, 3.0 if small else 8.0)
    task_epochs, task_batch = given(a.task_epochs, 5 if small else 3), 256 if small else 512
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    log(f"kfuse medical-code demo: {'small' if small else 'full'} size, D={dim}, device {dev}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    reasons = backend_reasons(torch.empty(1, 1, device=dev))
    fast = "triton" if dev.type == "cuda" else "cpu"
    if reasons[fast]:
        log(f"kfuse backend: reference (the {fast} kernels cannot run: {'; '.join(reasons[fast])}): slow")
    else:
        log(f"kfuse backend: {fast}")

    if a.claims:
        # A user's file is read against the whole lists with the default synthetic drug list, whatever
        # --small and --seed say: they drew other drug codes (and classes), and a file written with the
        # defaults was refused at --seed 1 or --small (demo hunt, 2026-12-05).
        vocab = load_code_vocab()
        try:
            claims, _ = read_claims_csv(a.claims, vocab, unknown="skip" if a.skip_unknown else "error")
        except ValueError as err:  # names the file and line: an error message, not a traceback
            msg = str(err).replace("(unknown='skip' drops such rows)", "(--skip-unknown drops such rows)")
            raise SystemExit(f"python -m kfuse.demos.medical_codes: error: --claims: {msg}") from None
    else:
        vocab = load_code_vocab(rx_codes=600 if small else 5000, rx_classes=40 if small else 150, seed=a.seed)
        if small:
            vocab = vocab.subset(60, 40, seed=a.seed)
        claims = synthetic_claims(vocab, ClaimsConfig(patients=patients, seed=a.seed))
    has_truth = claims.risk_logit is not None
    log(f"vocabulary: {vocab.sizes[0]:,} diagnoses (ICD-10-CM), {vocab.sizes[1]:,} procedures (ICD-10-PCS), "
        f"{vocab.sizes[2]:,} prescriptions (SYNTHETIC); claims: {claims.num_patients:,} patients, "
        f"{claims.num_visits:,} visits, {claims.num_codes:,} codes; Zipf slope (top 1000 dx) "
        f"{zipf_slope(claims.code_counts('dx')):.2f}"
        + ("" if claims.labels is None else f"; outcome rate {claims.labels.mean():.3f}")
        + (f"; AUC of the true risk {auc(claims.labels, claims.risk_logit):.3f}" if has_truth else "")
        + f" [{time.perf_counter() - t_start:.1f} s]")

    # General embedding.
    gen = GeneralCodeEmbedding(vocab.sizes, dim, lr=0.2, device=dev, seed=a.seed)
    res = train_general(gen, claims, epochs=epochs, batch_size=batch, seed=a.seed, progress=log)
    log(f"general embedding: {res['steps']} steps in {res['seconds']:.1f} s ({res['codes_per_s']:,.0f} codes/s), "
        f"loss {res['loss_first']:.3f} -> {res['loss_last']:.3f}")

    # Neighbours and category agreement.
    min_count = 5 if small else 20
    vecs = {d: gen.codes.vectors(d) for d in vocab.domains}
    counts = {d: claims.code_counts(d) for d in vocab.domains}
    agreement = {}
    for d in vocab.domains:
        eligible = np.flatnonzero(counts[d] >= min_count)
        scored = int((vocab.categories[d][eligible] >= 0).sum())  # the codes neighbour_agreement scores
        try:
            frac, chance = neighbour_agreement(vecs[d], vocab.categories[d], eligible, k=5)
        except ValueError as err:  # too few codes seen often enough (tiny claims)
            log(f"{d}: neighbour agreement skipped: {err}")
            continue
        agreement[d] = (frac, chance, scored)
        # (chance 0: every scored code's category has no other scored code, a small claims file; docs hunt)
        ratio = f"{frac / chance:.1f}x" if chance > 0 else "no ratio"
        log(f"{d}: {frac:.3f} of the 5 nearest neighbours share the category (chance {chance:.3f}, {ratio}) over "
            f"{scored:,} codes with a category seen >= {min_count} times")
    all_rows = [(d, r) for d in vocab.domains for r in range(vocab.size(d))]
    allv = torch.nn.functional.normalize(torch.cat([vecs[d] for d in vocab.domains]), dim=1)
    seen = torch.as_tensor(np.concatenate([counts[d] for d in vocab.domains]) >= min_count)
    for code, what in FAMOUS.items():
        try:
            r = vocab.lookup("dx", code)
        except KeyError:
            continue
        if counts["dx"][r] < min_count:
            continue
        sim = allv @ allv[r]
        sim[~seen] = -2
        sim[r] = -2
        log(f"nearest to {what}: {vocab.describe('dx', r)} (seen {counts['dx'][r]}x)")
        for j in sim.topk(5).indices.tolist():
            d, rr = all_rows[j]
            log(f"    {float(sim[j]):.2f}  {d}  {vocab.describe(d, rr)[:110]}")

    # The task, three variants, several seeds.
    aucs: dict[str, list[float]] = {"general": [], "task": [], "super": []}
    for s in range(a.seeds if claims.labels is not None else 0):
        # --seed moves the splits and the task models too (10_000 apart: seed 0 keeps the published runs').
        task_seed = s + 10_000 * a.seed
        rng = np.random.default_rng(1000 + task_seed)
        perm = rng.permutation(claims.num_patients)
        cut = int(0.8 * perm.size)
        tr, te = perm[:cut], perm[cut:]
        for variant in aucs:
            m = CodeOutcomeModel(variant, gen.codes, lr=0.1, device=dev, seed=task_seed)
            train_outcome(m, claims, tr, epochs=task_epochs, batch_size=task_batch, seed=task_seed)
            aucs[variant].append(auc(claims.labels[te], predict_outcome(m, claims, te)))
        log(f"task seed {s + 1}/{a.seeds}: AUC " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in aucs.items())
            + f" [{time.perf_counter() - t_start:.0f} s]")
    summary = {k: interval(v) for k, v in aucs.items() if v}
    for k, (mean, half) in summary.items():
        log(f"admission AUC, {k:7s} embedding: {mean:.3f} ± {half:.3f} (95 % t-interval, {a.seeds} seeds)")

    # Throughput: the same model and the same batches on each build, their steps interleaved (on a
    # shared machine the load changes by several times within a minute: interleaving gives every
    # build the same conditions); codes/s from the median step (forward, backward, optimizer).
    speed = race(vocab.sizes, dim, claims, batch, bench_s, dev, a.seed)
    for impl, v in speed.items():
        if isinstance(v, float):
            log(f"throughput {impl:6s}: {v:,.0f} codes/s (median step, batches of {batch} visits)")
    base = speed.get("kfuse")
    for impl, v in speed.items():
        if isinstance(v, float) and isinstance(base, float) and impl != "kfuse":
            log(f"kfuse vs {impl}: {base / v:.2f}x")
        elif isinstance(v, str):
            log(f"{impl}: {v}")

    total = time.perf_counter() - t_start
    truth = auc(claims.labels, claims.risk_logit) if has_truth else math.nan
    out = figure_path(a.out)  # what matplotlib writes
    _plot(out, summary, truth, agreement, speed, f"{'small' if small else 'full'} size, D={dim}, {dev}")
    log(f"saved {out}; total {total:.0f} s")
    return {"auc": summary, "true_risk_auc": truth, "agreement": agreement, "speed": speed, "seconds": total}


def race(sizes: list[int], dim: int, claims: Claims, batch: int, seconds: float, dev: torch.device, seed: int = 0,
         optimizer: str = "rowwise_adagrad") -> dict[str, float | str]:
    """Codes/s of the general embedding's training step on each build (``IMPLS``) with ``optimizer``, the same
    batches, steps interleaved for about ``seconds`` per build (after two warm-up steps each); a build that
    cannot run gets the reason (str)."""
    models: dict[str, GeneralCodeEmbedding] = {}
    out: dict[str, float | str] = {}
    for impl in IMPLS:
        if impl == "fbgemm" and dev.type != "cpu":
            out[impl] = "skipped: fbgemm-gpu-cpu runs CPU tensors"
            continue
        try:
            models[impl] = GeneralCodeEmbedding(sizes, dim, optimizer=optimizer, lr=0.2, impl=impl, device=dev,
                                                seed=seed)
        except (ImportError, ValueError) as err:
            out[impl] = f"skipped: {err}"
    for m in models.values():
        m.set_noise([claims.code_counts(d) for d in claims.domains])
    visits = np.random.default_rng(seed).permutation(np.flatnonzero(claims.visit_sizes() >= 2))
    gen = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {k: [] for k in models}
    codes, step, t0 = [], 0, time.perf_counter()
    # Two warm-up steps, then at least one timed step: the budget counts from the first timed one (warm-up
    # steps longer than the budget left nothing timed, and the median of nothing is NaN).
    while step < 3 or (time.perf_counter() - t0 < seconds * max(1, len(models)) and step < 400):
        if step == 2:
            t0 = time.perf_counter()
        ids = visits[(step * batch) % visits.size:][:batch]
        idx, off = claims.visit_bags(ids, dev)
        psw, tgt = cbow_batch(idx, off, len(claims.domains), next(iter(models.values())).bases, gen)
        neg = next(iter(models.values())).sample_negatives(ids.size, gen)
        for impl, m in models.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            m(idx, off, psw, tgt, neg).backward()
            m.update()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:
                times[impl].append(time.perf_counter() - t)
        if step >= 2:
            codes.append(idx.numel())
        step += 1
    mean_codes = float(np.mean(codes))
    for impl, ts in times.items():
        out[impl] = mean_codes / float(np.median(ts))
    return {k: out[k] for k in IMPLS if k in out}


def _plot(path: str, summary: dict, truth: float, agreement: dict, speed: dict, title: str) -> None:
    import matplotlib  # noqa: PLC0415  (demo dependency, imported lazily)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    names = list(summary)
    ax[0].bar(names, [summary[n][0] for n in names],
              yerr=[0 if math.isnan(summary[n][1]) else summary[n][1] for n in names], capsize=6,
              color=["#888", "#4a8", "#48c"])
    if not math.isnan(truth):
        ax[0].axhline(truth, ls="--", color="k", lw=1, label=f"the true risk ({truth:.3f})")
        ax[0].legend(loc="upper right")
    if names:
        ax[0].set_ylim(max(0.0, min(summary[n][0] for n in names) - 0.1), 1.0)
    ax[0].set_title("admission AUC (95 % CI over seeds)")
    doms = list(agreement)
    x = np.arange(len(doms))
    ax[1].bar(x - 0.2, [agreement[d][0] for d in doms], 0.4, label="5-NN share category")
    ax[1].bar(x + 0.2, [agreement[d][1] for d in doms], 0.4, label="chance")
    ax[1].set_xticks(x, doms)
    ax[1].legend()
    ax[1].set_title("nearest neighbours in the same category")
    ok = {k: v for k, v in speed.items() if isinstance(v, float)}
    ax[2].bar(list(ok), [v / 1e3 for v in ok.values()], color="#c84")
    ax[2].set_title("general-embedding training, k codes/s")
    fig.suptitle(f"kfuse medical codes ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
