"""nn.Module drop-ins built on kfuse ops."""

from kfuse.nn.code_embedding import CodeEmbedding, CodeOutcomeModel, GeneralCodeEmbedding
from kfuse.nn.deu import DEU, DEU_INITS, clip_deu_grad_norm_, deu_coeffs, deu_param_groups, init_deu_coeffs
from kfuse.nn.embedding import EmbeddingBag, MultiTableEmbeddingBag
from kfuse.nn.lora import LoRALinear, MultiLoRALinear

__all__ = ["DEU", "DEU_INITS", "CodeEmbedding", "CodeOutcomeModel", "EmbeddingBag", "GeneralCodeEmbedding",
           "LoRALinear", "MultiLoRALinear", "MultiTableEmbeddingBag", "clip_deu_grad_norm_", "deu_coeffs",
           "deu_param_groups", "init_deu_coeffs"]
