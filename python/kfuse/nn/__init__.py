"""nn.Module drop-ins built on kfuse ops."""

from kfuse.nn.deu import DEU
from kfuse.nn.embedding import EmbeddingBag, MultiTableEmbeddingBag
from kfuse.nn.lora import LoRALinear, MultiLoRALinear

__all__ = ["DEU", "EmbeddingBag", "LoRALinear", "MultiLoRALinear", "MultiTableEmbeddingBag"]
