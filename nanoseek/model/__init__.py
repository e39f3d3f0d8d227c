from .cache import StaticCache
from .transformer import Block, ModelOutput, Transformer, maxvio_per_layer

__all__ = ["Block", "ModelOutput", "StaticCache", "Transformer", "maxvio_per_layer"]
