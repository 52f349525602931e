from .cifarnet import MODELS, cifarnet, mlp
from .sequential import Sequential

__all__ = ["Sequential", "cifarnet", "mlp", "MODELS"]
