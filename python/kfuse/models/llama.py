"""A Llama decoder over :class:`kfuse.kv.PagedKVCache`, built from a ``transformers`` ``LlamaForCausalLM``.

Every sequence of a batch lives in the paged cache, so each one can roll back (``cache.rollback``) or
fork (``cache.fork``) on its own between calls, as safety backtracking needs (``shared/specs/kv.md``).

The weights are the Hugging Face model's own: this module holds references to its ``nn.Linear``
modules, norm weights, embedding and rotary module (nothing is copied, so the two models stay in
sync). One call is one cache step (``kfuse.kv`` module docstring): the new tokens of all sequences
are packed into ``[total, hidden]`` rows; each layer appends its K/V for them and attends causally
over the cache with :func:`kfuse.paged_prefill_attention` (:func:`kfuse.paged_decode_attention` when
every sequence feeds one token); ``cache.advance`` commits the lengths
once every layer has appended. A prompt and a single decode token are the same call.

Matching ``transformers`` (5.x, ``modeling_llama.py``):

- RMSNorm: normalised in float32, cast back to the input dtype, *then* scaled by the weight.
- Rotary embeddings: cos/sin come from the HF model's own rotary module (its ``inv_freq`` and
  ``attention_scaling``, so every ``rope_type`` it supports, ``llama3`` included, matches by
  construction). The dynamic types (``dynamic``, ``longrope``) pick their frequencies from the
  largest position of the call, as HF does for a padded batch.
- Attention: grouped-query (query head ``h`` reads KV head ``h // (Hq / Hkv)``, as ``repeat_kv``),
  softmax scale ``head_dim ** -0.5`` taken from the HF attention module; no dropout (inference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from kfuse.kv import PagedKVCache, _index_tensor
from kfuse.ops.kv import paged_decode_attention, paged_prefill_attention

if TYPE_CHECKING:
    import transformers

__all__ = ["LlamaForCausalLM"]


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's LlamaRMSNorm: x ``[T, hidden]`` normalised in float32, cast back to x's dtype before the
    weight ``[hidden]`` multiplies it (the cast's place changes the bits in half precision)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x ``[T, heads, head_dim]`` with cos, sin ``[T, 1, head_dim]`` (HF's
    ``rotate_half`` convention: the two halves of head_dim are the pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _DecoderLayer(nn.Module):
    """One Llama decoder layer over HF's ``LlamaDecoderLayer``'s modules and weights (shared)."""

    def __init__(self, hf_layer: nn.Module, eps: float) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn  # the config's hidden_act, as HF resolved it
        self.input_norm = hf_layer.input_layernorm.weight  # the same nn.Parameter objects
        self.post_norm = hf_layer.post_attention_layernorm.weight
        self.head_dim = attn.head_dim
        self.scaling = float(attn.scaling)
        self.eps = eps

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, cache: PagedKVCache, layer: int, seq_ids: Tensor,
                counts: Tensor, decode: bool) -> Tensor:
        """h ``[T, hidden]`` (model dtype) -> ``[T, hidden]``; cos, sin ``[T, 1, head_dim]``; seq_ids, counts:
        validated CPU int64 ``[n]``; ``decode``: every count is 1. Appends this layer's K/V for the T new
        tokens to ``cache``."""
        t, d = h.shape[0], self.head_dim
        x = _rms_norm(h, self.input_norm, self.eps)
        q = _rope(self.q_proj(x).view(t, -1, d), cos, sin)
        k = _rope(self.k_proj(x).view(t, -1, d), cos, sin)
        v = self.v_proj(x).view(t, -1, d)
        # A cache may hold another dtype than the model (e.g. a bf16 cache for a float32 model):
        # attention runs in the cache's dtype and its output returns to the model's.
        cache.append(layer, seq_ids, k.to(cache.dtype), v.to(cache.dtype), counts)
        # One new token per sequence (a decode step, or re-feeding a checkpoint's token): the decode kernels,
        # which split long contexts and share each K/V tile among a KV head's query heads (the Triton
        # prefill kernel would give every query head a 64-row block holding one token).
        if decode:
            o = paged_decode_attention(q.to(cache.dtype), cache, layer, seq_ids, scale=self.scaling)
        else:
            o = paged_prefill_attention(q.to(cache.dtype), cache, layer, seq_ids, q_lens=counts, scale=self.scaling)
        h = h + self.o_proj(o.to(h.dtype).reshape(t, -1))
        x = _rms_norm(h, self.post_norm, self.eps)
        return h + self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaForCausalLM(nn.Module):
    """Llama causal LM running on a :class:`kfuse.kv.PagedKVCache`; build it with :meth:`from_hf`.

    ``model(tokens, seq_ids, cache)`` appends each sequence's new tokens at its current length and
    returns their logits; between calls any sequence may be rolled back or forked in the cache.
    Inference only (runs under ``torch.no_grad``). CPU tensors use kfuse's C++ attention kernels,
    CUDA tensors its Triton kernels (through :func:`kfuse.paged_prefill_attention` and
    :func:`kfuse.paged_decode_attention`).
    """

    def __init__(self, hf_model: transformers.LlamaForCausalLM, *, fuse_lora: bool = True) -> None:
        """Same as :meth:`from_hf`."""
        from transformers import LlamaForCausalLM as HFLlama  # noqa: PLC0415 (transformers is optional)

        if hasattr(hf_model, "get_base_model") and hasattr(hf_model, "peft_config"):  # a peft.PeftModel
            hf_model = hf_model.get_base_model()
        if not isinstance(hf_model, HFLlama):
            raise TypeError(f"hf_model must be a transformers.LlamaForCausalLM (or a peft.PeftModel of one); got "
                            f"{type(hf_model).__name__}")
        if fuse_lora and any(type(m).__module__.startswith("peft.") for m in hf_model.modules()):
            from kfuse.integrations.peft import fuse  # noqa: PLC0415 (peft is optional)

            fuse(hf_model)  # in place: the layers' PEFT state stays live; kfuse.integrations.peft.unfuse undoes it
        super().__init__()
        cfg, base = hf_model.config, hf_model.model
        self.embed_tokens = base.embed_tokens
        self.layers = nn.ModuleList(_DecoderLayer(layer, cfg.rms_norm_eps) for layer in base.layers)
        self.norm = base.norm.weight
        self.lm_head = hf_model.lm_head  # with tied embeddings its weight IS embed_tokens.weight
        self.rotary_emb = base.rotary_emb
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.head_dim = base.layers[0].self_attn.head_dim  # may differ from hidden / heads (config.head_dim)
        self.num_kv_heads = cfg.num_key_value_heads

    @classmethod
    def from_hf(cls, hf_model: transformers.LlamaForCausalLM, *, fuse_lora: bool = True) -> LlamaForCausalLM:
        """kfuse's decoder over ``hf_model``, sharing its parameters and rotary module (no copies: later
        changes to either model's weights show in both).

        ``hf_model``: a ``transformers.LlamaForCausalLM``, or a ``peft.PeftModel`` wrapping one. Layers that
        carry PEFT LoRA adapters run them (the model calls each projection module as it is); with
        ``fuse_lora`` (the default) they are first switched in place to kfuse's LoRA op by
        :func:`kfuse.integrations.peft.fuse` (which lists any layer it leaves to PEFT in one warning;
        :func:`kfuse.integrations.peft.unfuse` switches them back)."""
        return cls(hf_model, fuse_lora=fuse_lora)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (the embedding's)."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """The weights' device (the embedding's)."""
        return self.embed_tokens.weight.device

    def new_cache(self, page_size: int = 16, *, num_pages: int, max_seqs: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, max_pages_per_seq: int | None = None) -> PagedKVCache:
        """A :class:`kfuse.kv.PagedKVCache` shaped for this model: ``num_layers``, ``num_kv_heads``, ``head_dim``
        from the model; ``dtype`` and ``device`` default to the model's. The other arguments are the
        cache's (``num_pages`` pages of ``page_size`` tokens shared by up to ``max_seqs`` sequences)."""
        return PagedKVCache(len(self.layers), self.num_kv_heads, self.head_dim, page_size, num_pages, max_seqs,
                            dtype=self.dtype if dtype is None else dtype,
                            device=self.device if device is None else device, max_pages_per_seq=max_pages_per_seq)

    def _check_tokens(self, t: object, what: str) -> None:
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != torch.int64:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{what} must be a 1-D int64 tensor of token ids; got {got}")
        # Range-checked on the host only: on a GPU the check would sync (embedding then asserts).
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
            raise ValueError(f"{what} holds ids outside [0, vocab_size={self.vocab_size}): "
                             f"min {int(t.min())}, max {int(t.max())}")

    def _check_cache(self, cache: object) -> None:
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a kfuse.kv.PagedKVCache; got {type(cache).__name__}")
        want = (len(self.layers), self.num_kv_heads, self.head_dim)
        have = (cache.num_layers, cache.num_kv_heads, cache.head_dim)
        if have != want:
            raise ValueError(f"cache has (num_layers, num_kv_heads, head_dim) = {have}; the model needs {want} "
                             "(use model.new_cache)")
        if cache.device != self.device:
            raise ValueError(f"cache is on {cache.device}; the model is on {self.device}")
        cache._no_step("LlamaForCausalLM")  # another caller's open step is not ours to abort

    def forward(self, tokens: list[Tensor], seq_ids, cache: PagedKVCache) -> list[Tensor]:
        """Append ``tokens[i]`` to sequence ``seq_ids[i]`` and return their logits.

        Args:
            tokens: one int64 ``[len_i]`` tensor per sequence (lengths may differ; 0 is allowed), any device.
            seq_ids: distinct active sequence ids of ``cache`` (ints or a 1-D CPU integer tensor), ``n`` of them.
            cache: a :class:`kfuse.kv.PagedKVCache` for this model (:meth:`new_cache`).
        Returns:
            ``n`` tensors ``[len_i, vocab_size]`` in the model's dtype: row ``j`` is the next-token logits
            after the token at position ``cache.length(seq_ids[i]) + j`` (lengths as before the call).

        One cache step (see :meth:`forward_packed`); on any error the cache is left as it was.
        """
        if not isinstance(tokens, (list, tuple)):
            raise TypeError(f"tokens must be a list of 1-D int64 tensors; got {type(tokens).__name__}")
        for i, t in enumerate(tokens):
            self._check_tokens(t, f"tokens[{i}]")
        n = _index_tensor(seq_ids, "seq_ids").numel()
        if len(tokens) != n:
            raise ValueError(f"tokens has {len(tokens)} entries; seq_ids has {n} (one tensor per sequence)")
        counts = [t.numel() for t in tokens]
        flat = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.int64)
        return list(self.forward_packed(flat, counts, seq_ids, cache).split(counts))

    @torch.no_grad()
    def forward_packed(self, flat_tokens: Tensor, counts, seq_ids, cache: PagedKVCache) -> Tensor:
        """:meth:`forward` on packed tokens: ``flat_tokens`` int64 ``[total]`` holds ``counts[i]`` new tokens
        of ``seq_ids[i]``, in order; returns logits ``[total, vocab_size]`` in the model's dtype.

        ``counts``: ``n`` ints ``>= 0`` (or a 1-D CPU integer tensor) summing to ``total``. Positions are
        ``cache.length(s) + 0 … counts[i] − 1``; every layer appends its K/V there and attends causally
        over the cache, then ``cache.advance(seq_ids, counts)``. Errors raise before the cache changes
        (``seq_ids``' errors are the cache's); an error during the step calls ``cache.abort_step()``, so the
        lengths are unchanged.
        """
        self._check_tokens(flat_tokens, "flat_tokens")
        self._check_cache(cache)
        ids = cache._ids(seq_ids)  # known, active, distinct: the cache's own checks and messages
        cnt = _index_tensor(counts, "counts")
        if cnt.numel() != ids.numel() or (cnt < 0).any() or int(cnt.sum()) != flat_tokens.numel():
            raise ValueError(f"counts {cnt.tolist()} must have one entry >= 0 per sequence ({ids.numel()}) summing "
                             f"to flat_tokens' {flat_tokens.numel()} tokens")
        total = flat_tokens.numel()
        if total == 0:  # nothing to append: no step (the rotary module cannot take empty positions)
            return torch.zeros(0, self.vocab_size, dtype=self.dtype, device=self.device)
        # Position of each new token: its sequence's committed length plus its index within the sequence.
        start = cache.kv_lens(0, ids) - (torch.cumsum(cnt, 0) - cnt)  # no step is open: committed lengths
        pos = cache._dev(torch.repeat_interleave(start, cnt) + torch.arange(total))  # pinned, no sync on CUDA
        # Host tokens cross through pinned memory (cache._dev): a plain .to("cuda") would wait for the GPU.
        tok = cache._dev(flat_tokens) if flat_tokens.device.type == "cpu" else flat_tokens.to(self.device)
        h = self.embed_tokens(tok)  # [total, hidden]
        cos, sin = self.rotary_emb(h, pos[None])  # [1, total, head_dim] each, in h's dtype
        cos, sin = cos[0, :, None], sin[0, :, None]
        try:
            decode = bool((cnt == 1).all())
            for layer, block in enumerate(self.layers):
                h = block(h, cos, sin, cache, layer, ids, cnt, decode)
            logits = self.lm_head(_rms_norm(h, self.norm, self.eps))
            cache.advance(ids, cnt)
        except BaseException:
            cache.abort_step()  # releases the step's pages; committed lengths never moved
            raise
        return logits
