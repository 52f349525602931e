"""Layers with explicit forward(x, train) and backward(dy) -> dx."""
from .base import Layer, ReusableLayer
from .conv import Conv2D, col2im, im2col
from .dense import Dense
from .lrn import LocalResponseNorm
from .norm import BatchNorm
from .pool import MaxPool2D
from .simple import Dropout, Flatten, ReLU

__all__ = ["Layer", "ReusableLayer", "Conv2D", "Dense", "ReLU", "MaxPool2D", "LocalResponseNorm",
           "Dropout", "Flatten", "im2col", "col2im"]
