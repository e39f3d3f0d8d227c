"""nanoseek: the DeepSeek-V3 / R1 system in PyTorch."""

from .config import PRESETS, ConfigError, ModelConfig, preset
from .model import ModelOutput, StaticCache, Transformer

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device=None, **kwargs) -> Transformer:
    """Load an HF-layout DeepSeek checkpoint (V2 or V3, BF16 or FP8) or one nanoseek saved."""
    from .hf import from_pretrained as _load
    return _load(path, dtype=dtype, device=device, **kwargs)


__all__ = ["PRESETS", "ConfigError", "ModelConfig", "ModelOutput", "StaticCache", "Transformer",
           "from_pretrained", "preset", "__version__"]
