"""nn.Module drop-ins built on kfuse ops."""

from kfuse.nn.deu import DEU

__all__ = ["DEU"]
