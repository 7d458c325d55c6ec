"""Frequency stream (Section 3.5): one-level Haar DWT (Eq. 8) feeding a ConvNeXt pyramid (Eq. 9).

Band naming, identical to PyWavelets' ``pywt.dwt2(x, "haar")`` -> ``(cA, (cH, cV, cD))``:

====  ======  ===============================================  ====================
ours  pywt    meaning                                          2x2 kernel (x 1/2)
====  ======  ===============================================  ====================
LL    cA      local mean (coarse anatomy)                      [[1, 1], [1, 1]]
LH    cH      horizontal edges: low-pass along W, high along H [[1, 1], [-1, -1]]
HL    cV      vertical edges: high-pass along W, low along H   [[1, -1], [1, -1]]
HH    cD      diagonal detail                                  [[1, -1], [-1, 1]]
====  ======  ===============================================  ====================

Notable choices:
* The DWT is a fixed stride-2 convolution with the orthonormal Haar kernels (exact, differentiable, energy
  preserving) rather than ``pytorch_wavelets``, whose import is broken on setuptools >= 82.
* The encoder input is band-major: ``concat(I_LL, I_LH, I_HL, I_HH)`` with the image channels inside each band
  (12 channels for RGB). LL is halved so that it is the local mean, on the scale of the image itself.
* A 1x1 stride-1 stem keeps the 112x112 sub-band grid, so the ConvNeXt stages give F_stem at 112 (stem and
  stage 0), F1 at 56, F2 at 28 and F3 at 14. Channel counts come from ``feature_info``.
* The DWT and that 1x1 stem are both linear, so ``FrequencyEncoder`` runs them as one 2x2 stride-2 convolution on
  the pixels whose kernel is composed from the stem's weights at every call (:func:`haar_stem_kernel`): the same
  function and the same parameters, without the 12-channel sub-band tensor and its band-major copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BANDS = ("LL", "LH", "HL", "HH")
HAAR_KERNELS = torch.tensor(
    [[[1, 1], [1, 1]], [[1, 1], [-1, -1]], [[1, -1], [1, -1]], [[1, -1], [-1, 1]]], dtype=torch.float64
) / 2


def haar_dwt(image: Tensor) -> Tensor:
    """One-level orthonormal 2-D Haar DWT.

    Args:
        image: (B, C, H, W) with even H and W.
    Returns:
        (B, C, 4, H/2, W/2) with bands in the order LL, LH, HL, HH (PyWavelets' cA, cH, cV, cD).
    """
    batch, channels, height, width = image.shape
    if height % 2 or width % 2:
        raise ValueError(f"haar_dwt needs even height and width, got {height}x{width}")
    kernels = HAAR_KERNELS.to(device=image.device, dtype=image.dtype)[:, None]           # (4, 1, 2, 2)
    bands = F.conv2d(image.reshape(batch * channels, 1, height, width), kernels, stride=2)
    return bands.reshape(batch, channels, 4, height // 2, width // 2)


def haar_idwt(bands: Tensor) -> Tensor:
    """Inverse of :func:`haar_dwt`: (B, C, 4, h, w) -> (B, C, 2h, 2w)."""
    batch, channels, _, height, width = bands.shape
    kernels = HAAR_KERNELS.to(device=bands.device, dtype=bands.dtype)[:, None]
    image = F.conv_transpose2d(bands.reshape(batch * channels, 4, height, width), kernels, stride=2)
    return image.reshape(batch, channels, 2 * height, 2 * width)


def subband_input(image: Tensor) -> Tensor:
    """The frequency encoder's input I_dwt: (B, C, H, W) -> (B, 4C, H/2, W/2), band-major, LL halved."""
    bands = haar_dwt(image)                                                          # (B, C, 4, h, w)
    scale = bands.new_tensor([0.5, 1.0, 1.0, 1.0]).view(1, 1, 4, 1, 1)
    return (bands * scale).transpose(1, 2).flatten(1, 2)                             # (B, 4C, h, w)


def haar_stem_kernel(stem_weight: Tensor, image_channels: int) -> Tensor:
    """The 1x1 stem over :func:`subband_input` as one 2x2 stride-2 kernel on the pixels (exact: both are linear).

    Args:
        stem_weight: (C_out, 4 * image_channels, 1, 1), band-major input channels like ``subband_input``.
    Returns:
        (C_out, image_channels, 2, 2): ``conv2d(image, kernel, stride=2) == conv2d(subband_input(image), stem_weight)``.
    """
    out_channels = stem_weight.shape[0]
    scale = stem_weight.new_tensor([0.5, 1.0, 1.0, 1.0]).view(4, 1, 1)                 # LL halved
    bands = HAAR_KERNELS.to(stem_weight) * scale                                        # (4, 2, 2)
    weight = stem_weight.reshape(out_channels, 4, image_channels, 1, 1)                 # (C_out, band, C, 1, 1)
    # A broadcast product and a sum, not einsum: autocast would run a matmul in bf16 and round the kernel.
    return (weight * bands[None, :, None]).sum(1)                                       # (C_out, C, 2, 2)


class FrequencyEncoder(nn.Module):
    """Haar DWT + ConvNeXt (Eq. 8-9): image (B, 3, 224, 224) -> F_stem, F1, F2, F3 at 112, 56, 28, 14."""

    def __init__(self, convnext: nn.Module) -> None:
        super().__init__()
        self.convnext = convnext
        self.channels = tuple(info["num_chs"] for info in convnext.feature_info)   # (C_s, C'1, C'2, C'3)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self.stem(image)                                                       # (B, C_s, 112, 112)  Eq. 8
        f_stem = self.convnext.stages[0](x)                                        # (B, C_s, 112, 112)
        f1 = self.convnext.stages[1](f_stem)                                       # (B, C'1, 56, 56)
        f2 = self.convnext.stages[2](f1)                                           # (B, C'2, 28, 28)
        f3 = self.convnext.stages[3](f2)                                           # (B, C'3, 14, 14)
        return f_stem, f1, f2, f3

    def stem(self, image: Tensor) -> Tensor:
        """ConvNeXt stem on the Haar sub-bands, ``stem(subband_input(image))``: (B, C, 224, 224) -> (B, C_s, 112, 112)."""
        if image.shape[-2] % 2 or image.shape[-1] % 2:
            raise ValueError(f"the Haar DWT needs even height and width, got {image.shape[-2]}x{image.shape[-1]}")
        conv, *rest = self.convnext.stem
        x = F.conv2d(image, haar_stem_kernel(conv.weight, image.shape[1]), conv.bias, stride=2)
        for layer in rest:
            x = layer(x)
        return x


def _conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.GELU(),
        nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.GELU(),
    )


class UNetEncoder(nn.Module):
    """The UNet-CLIP baseline's encoder: plain conv blocks on the pixels, no frequency decomposition.

    Image (B, 3, 224, 224) -> features at 112, 56, 28, 14, the same pyramid the frequency stream gives, so the
    baseline reuses the very same text-conditioned decoder.
    """

    def __init__(self, channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        widths = (3, *channels)
        self.levels = nn.ModuleList(_conv_block(widths[i], widths[i + 1], stride=2) for i in range(4))
        self.channels = tuple(channels)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        features = []
        x = image
        for level in self.levels:
            x = level(x)
            features.append(x)
        return tuple(features)                                                     # 112, 56, 28, 14
