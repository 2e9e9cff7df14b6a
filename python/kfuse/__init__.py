"""kfuse: fused PyTorch kernels (Triton, CUDA and C++ CPU) with PyTorch references.

Ops: :func:`kfuse.deu` (per-neuron Differential Equation Unit activations),
:func:`kfuse.lora_linear` and :func:`kfuse.lora_linear_multi` (LoRA-adapted linear layers),
:func:`kfuse.paged_decode_attention` and :func:`kfuse.paged_prefill_attention` (over a
:class:`kfuse.kv.PagedKVCache`), :func:`kfuse.embedding_bag` and :func:`kfuse.multi_embedding_bag`.
Modules: :class:`kfuse.nn.DEU`, :class:`kfuse.nn.LoRALinear`, :class:`kfuse.nn.MultiLoRALinear`,
:class:`kfuse.nn.EmbeddingBag`, :class:`kfuse.nn.MultiTableEmbeddingBag`; models:
:class:`kfuse.models.LlamaForCausalLM` (a ``transformers`` Llama running on the paged cache), and
:func:`kfuse.backtrack.generate` (batched generation that backtracks a flagged sequence to its last
safe checkpoint).
``python -m kfuse`` checks and times every backend.
``kfuse.availability()`` says which backends this machine can run, and why not.
"""

import torch  # noqa: F401  (the extension needs torch loaded first)

from kfuse import backtrack, kv, models, nn, reference
from kfuse._backends import BackendUnavailableError, availability
from kfuse.ops.deu import deu
from kfuse.ops.embedding import check_embedding_errors, embedding_bag, multi_embedding_bag
from kfuse.ops.kv import paged_decode_attention, paged_prefill_attention
from kfuse.ops.lora import lora_linear, lora_linear_multi

__all__ = [
    "BackendUnavailableError", "availability", "backtrack", "check_embedding_errors", "deu", "embedding_bag", "kv",
    "lora_linear",
    "lora_linear_multi", "models", "multi_embedding_bag", "nn", "paged_decode_attention", "paged_prefill_attention",
    "reference",
]
__version__ = "0.1.0"
