"""The sizes of one convolution, computed in one place: ConvGeometry.

An NHWC input (B, h, w, C) padded by (top, bottom, left, right) is (B, hp, wp, C); a kh x kw
window moved by ``stride`` fits oh x ow times; with M output channels the product is
(outputs, K) @ (K, M), outputs = B * oh * ow and K = kh * kw * C. The layers' im2col and
col2im (conv_geometry.py), the CPU fast path, the exact-step kernels and deep reuse's pixel
path (reference and CUDA) all read their sizes from here.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one convolution (or pooling window) on an NHWC input; M is 0 where the caller
    has no weights (im2col, col2im)."""

    B: int
    h: int
    w: int
    C: int
    kh: int
    kw: int
    stride: int
    pads: tuple     # (top, bottom, left, right)
    M: int = 0

    @classmethod
    def of(cls, x_shape, kh, kw, stride, pads, M=0):
        B, h, w, C = (int(v) for v in x_shape)
        return cls(B, h, w, C, int(kh), int(kw), int(stride), tuple(int(p) for p in pads), int(M))

    @property
    def top(self):
        return self.pads[0]

    @property
    def left(self):
        return self.pads[2]

    @property
    def hp(self):
        return self.h + self.pads[0] + self.pads[1]

    @property
    def wp(self):
        return self.w + self.pads[2] + self.pads[3]

    @property
    def oh(self):
        return (self.hp - self.kh) // self.stride + 1

    @property
    def ow(self):
        return (self.wp - self.kw) // self.stride + 1

    @property
    def outputs(self):
        return self.B * self.oh * self.ow

    @property
    def K(self):
        return self.kh * self.kw * self.C
