from .cifarnet import MODELS, cifarnet, mlp
from .sequential import Sequential, atomic_savez

__all__ = ["Sequential", "cifarnet", "mlp", "MODELS", "atomic_savez"]
