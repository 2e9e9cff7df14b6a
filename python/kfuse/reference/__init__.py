"""Pure-PyTorch references: the definition of each op, written for clarity."""

from kfuse.reference.deu import deu_reference
from kfuse.reference.lora import lora_linear_multi_reference, lora_linear_reference

__all__ = ["deu_reference", "lora_linear_multi_reference", "lora_linear_reference"]
