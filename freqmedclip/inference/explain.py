"""Explanations as arrays: the Haar sub-bands the encoder sees, per-stream Grad-CAM, FFBI attention.

Notable choices:
* Grad-CAM differentiates the fused logits with respect to both streams' bottleneck features (S1 and F3, 14x14,
  what FFBI receives), through the bottleneck only, so one backward gives both maps and both measure the same
  path (S1 also seeds the FPN's top-down S2-S4, a path F3 has no counterpart of; it is left out).
* It needs no hooks: :meth:`FreqMedCLIP.encode` gives the features (without gradients, possibly from a batched
  forward that already ran), and only :meth:`FreqMedCLIP.decode` of the explained row runs again, with S1 and F3
  as gradient leaves. That decoding is in fp32 even when the prediction used bf16/fp16 autocast: it is one row,
  and half-precision gradients would blur or underflow the maps. The backward (``torch.autograd.grad``) stops at
  the leaves and touches no parameter's ``.grad``. The target is the sum of the fused logits inside the predicted
  region (the whole image if nothing is predicted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from freqmedclip.modeling.frequency import BANDS, subband_input
from freqmedclip.modeling.model import ALL_ON, FreqMedCLIP, StreamFeatures, Switches


def wavelet_bands(image: Tensor) -> dict[str, np.ndarray]:
    """The four Haar sub-bands exactly as the frequency encoder receives them, averaged over colour channels.

    image: (1, 3, H, W) in [0, 1]. Returns {"LL", "LH", "HL", "HH"} -> (H/2, W/2) float32 arrays (LL is the local
    mean; the detail bands are signed).
    """
    bands = subband_input(image if image.is_floating_point() else image.float())[0]                                         # (4 * 3, H/2, W/2), band-major
    per_band = bands.unflatten(0, (4, -1)).mean(1)                                  # (4, H/2, W/2)
    return {name: per_band[i].cpu().numpy() for i, name in enumerate(BANDS)}


class StreamCAMs(NamedTuple):
    semantic: np.ndarray | None      # (H, W) in [0, 1], Grad-CAM on S1 (before FFBI)
    frequency: np.ndarray | None     # (H, W) in [0, 1], Grad-CAM on F3 (before FFBI)


def _normalised_cam(activation: Tensor, gradient: Tensor, size: tuple[int, int]) -> np.ndarray:
    weights = gradient.mean((2, 3), keepdim=True)                                   # (1, C, 1, 1)
    cam = F.relu((weights * activation).sum(1, keepdim=True))                       # (1, 1, 14, 14)
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    return (cam / cam.max().clamp_min(1e-12)).detach().cpu().numpy()


def stream_gradcam(model: FreqMedCLIP, image: Tensor, prompt: str, switches: Switches = ALL_ON) -> StreamCAMs:
    """Grad-CAM of the fused prediction with respect to each stream's bottleneck features.

    image: (1, 3, 224, 224) in [0, 1]. Maps are (224, 224); a stream the variant lacks gives None.
    """
    with torch.no_grad():
        features = model.encode(image, [prompt], switches)
    return features_gradcam(model, features, tuple(image.shape[-2:]), switches)


def features_gradcam(model: FreqMedCLIP, features: StreamFeatures, size: tuple[int, int],
                     switches: Switches = ALL_ON) -> StreamCAMs:
    """Grad-CAM from already encoded features of one row (``StreamFeatures.row``): reruns only the decoding.

    Maps are ``size`` (the model's input size); a stream that is absent or switched off gives None (the UNet-CLIP
    baseline's pixel-domain encoder is not a frequency stream, so it has no frequency map either).
    """
    features = _in_fp32(features)
    semantic = None if features.semantic is None else features.semantic[0].requires_grad_(True)
    frequency = None
    if model.config.uses_frequency and switches.frequency:
        frequency = features.frequency[0].requires_grad_(True)
    leaves = {name: leaf for name, leaf in (("semantic", semantic), ("frequency", frequency)) if leaf is not None}
    if not leaves:
        return StreamCAMs(None, None)
    device_type = next(iter(leaves.values())).device.type
    with torch.enable_grad(), torch.autocast(device_type, enabled=False):
        logits = model.decode(features, switches=switches).logits
        region = (logits.detach() > 0).float()
        if region.sum() == 0:
            region = torch.ones_like(region)
        gradients = torch.autograd.grad((logits * region).sum(), list(leaves.values()), allow_unused=True)
    maps = {name: (_normalised_cam(leaf, gradient, size) if gradient is not None else None)
            for (name, leaf), gradient in zip(leaves.items(), gradients, strict=True)}
    return StreamCAMs(maps.get("semantic"), maps.get("frequency"))


def _in_fp32(features: StreamFeatures) -> StreamFeatures:
    """The features in fp32, detached from any graph (the bottlenecks become gradient leaves; nothing is copied
    that is already fp32)."""
    def to_fp32(maps: tuple[Tensor, ...] | None) -> tuple[Tensor, ...] | None:
        return None if maps is None else tuple(m.detach().float() for m in maps)

    condition = None if features.condition is None else features.condition.detach().float()
    return StreamFeatures(to_fp32(features.semantic), to_fp32(features.frequency), condition)


def mean_cams(cams: Sequence[StreamCAMs]) -> StreamCAMs:
    """The ensemble's Grad-CAM: per stream, the mean of the members' (already min-max normalised) maps."""
    means = []
    for stream in StreamCAMs._fields:
        maps = [getattr(c, stream) for c in cams if getattr(c, stream) is not None]
        means.append(np.mean(maps, axis=0) if maps else None)
    return StreamCAMs(*means)


class AttentionMaps(NamedTuple):
    semantic_to_frequency: np.ndarray   # (14, 14): where the semantic token at (row, col) reads in the frequency map
    frequency_to_semantic: np.ndarray   # (14, 14): where the frequency token at (row, col) reads in the semantic map


@torch.no_grad()
def ffbi_attention(model: FreqMedCLIP, image: Tensor, prompt: str, row: int, col: int) -> AttentionMaps:
    """FFBI's attention from the bottleneck token at (row, col) of the 14x14 grid, in both directions.

    image: (1, 3, 224, 224). Raises ValueError for variants without FFBI.
    """
    if model.config.streams != "both" or model.config.fusion != "ffbi":
        raise ValueError(f"variant {model.config.variant!r} has no FFBI cross-attention")
    output = model(image, [prompt], return_attention=True)
    grid = int(output.semantic_attention.shape[-1] ** 0.5)
    if not (0 <= row < grid and 0 <= col < grid):
        raise ValueError(f"token ({row}, {col}) is outside the {grid}x{grid} bottleneck grid")
    index = row * grid + col
    to_frequency = output.semantic_attention[0, index].reshape(grid, grid).float().cpu().numpy()
    to_semantic = output.frequency_attention[0, index].reshape(grid, grid).float().cpu().numpy()
    return AttentionMaps(to_frequency, to_semantic)
