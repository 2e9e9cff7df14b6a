"""nn.Module drop-ins built on kfuse ops."""

from kfuse.nn.code_embedding import CodeEmbedding, CodeOutcomeModel, GeneralCodeEmbedding
from kfuse.nn.deu import DEU
from kfuse.nn.embedding import EmbeddingBag, MultiTableEmbeddingBag
from kfuse.nn.lora import LoRALinear, MultiLoRALinear

__all__ = ["DEU", "CodeEmbedding", "CodeOutcomeModel", "EmbeddingBag", "GeneralCodeEmbedding", "LoRALinear",
           "MultiLoRALinear", "MultiTableEmbeddingBag"]
