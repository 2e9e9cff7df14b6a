"""Pure-PyTorch references: the definition of each op, written for clarity."""

from kfuse.reference.deu import deu_reference

__all__ = ["deu_reference"]
