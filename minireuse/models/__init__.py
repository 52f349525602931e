from .alexnet import alexnet, vgg19
from .cifarnet import MODELS, cifarnet, mlp
from .sequential import Sequential

__all__ = ["Sequential", "alexnet", "cifarnet", "mlp", "vgg19", "MODELS"]
