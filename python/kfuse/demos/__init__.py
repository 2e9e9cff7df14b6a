"""Runnable demos of the op families' papers: ``python -m kfuse.demos.<name>``.

- ``backtrack``: "Backtracking for Safety" — plain generation, reset on violation, kfuse's
  per-sequence backtracking and backtracking on ``transformers``' ``DynamicCache``, side by side.
"""
