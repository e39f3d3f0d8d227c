"""nanoseek: the DeepSeek-V3 / R1 system in PyTorch."""

from .config import PRESETS, ConfigError, ModelConfig, preset
from .model import ModelOutput, StaticCache, Transformer

__version__ = "0.1.0"


from .hf import from_pretrained, save_pretrained


__all__ = ["PRESETS", "ConfigError", "ModelConfig", "ModelOutput", "StaticCache", "Transformer",
           "from_pretrained", "preset", "save_pretrained", "__version__"]
