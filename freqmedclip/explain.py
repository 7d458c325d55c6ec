"""Explanations as arrays: the Haar sub-bands the encoder sees, per-stream Grad-CAM, FFBI attention.

Notable choices:
* Grad-CAM uses plain hooks on the model's named taps (``semantic_tap`` on S1, ``frequency_tap`` on F3, both
  14x14 and both trainable-path tensors), so one forward and one backward give both maps. The backward asks for
  the taps' gradients only (``torch.autograd.grad``): it stops at the taps and touches no parameter's ``.grad``.
  The target is the sum of the fused logits inside the predicted region (the whole image if nothing is predicted).
* Hooks live on shared modules, so registering them and the forward are serialised by a lock: concurrent
  requests of a server can never see each other's activations.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .frequency import BANDS, subband_input
from .model import ALL_ON, FreqMedCLIP, Switches

_HOOK_LOCK = threading.Lock()


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
    return (cam / cam.max().clamp_min(1e-12)).detach().float().cpu().numpy()


def stream_gradcam(model: FreqMedCLIP, image: Tensor, prompt: str, switches: Switches = ALL_ON) -> StreamCAMs:
    """Grad-CAM of the fused prediction with respect to each stream's bottleneck features.

    image: (1, 3, 224, 224) in [0, 1]. Maps are (224, 224); a stream the variant lacks gives None.
    """
    taps = {"semantic": model.semantic_tap if model.semantic is not None else None,
            "frequency": model.frequency_tap if model.config.uses_frequency else None}
    activations: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            if output.requires_grad:  # a switched-off stream's tap carries constant zeros: no map
                activations[name] = output
        return hook

    with _HOOK_LOCK:
        handles = [tap.register_forward_hook(keep(name)) for name, tap in taps.items() if tap is not None]
        try:
            with torch.enable_grad():
                # The image needs a gradient so that even a fully frozen semantic path (no TCA) builds a graph.
                output = model(image.detach().clone().requires_grad_(True), [prompt], switches=switches)
        finally:
            for handle in handles:
                handle.remove()
    if not activations:
        return StreamCAMs(None, None)
    logits = output.logits
    region = (logits.detach() > 0).float()
    if region.sum() == 0:
        region = torch.ones_like(region)
    # Gradients to the taps only: autograd runs just the decoders and the fusion (never the encoders) and
    # leaves no .grad on any parameter.
    gradients = torch.autograd.grad((logits * region).sum(), list(activations.values()), allow_unused=True)
    size = tuple(image.shape[-2:])
    maps = {name: (_normalised_cam(a, g, size) if g is not None else None)
            for (name, a), g in zip(activations.items(), gradients, strict=True)}
    return StreamCAMs(maps.get("semantic"), maps.get("frequency"))


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
