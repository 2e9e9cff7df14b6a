"""Decoder models that run on kfuse's ops and :class:`kfuse.kv.PagedKVCache` (per-sequence rollback).

:class:`LlamaForCausalLM` wraps a ``transformers`` Llama model (weights shared, not copied).
"""

from kfuse.models.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
