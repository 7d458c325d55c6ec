"""Explanations as arrays: the Haar sub-bands the encoder sees, per-stream Grad-CAM, FFBI attention.

Notable choices:
* Grad-CAM differentiates the fused logits with respect to both streams' bottleneck features (S1 and F3, 14x14,
  what FFBI receives), through the bottleneck only, so one backward gives both maps and both measure the same
  path (S1 also seeds the FPN's top-down S2-S4, a path F3 has no counterpart of; it is left out).
* It needs no hooks: :meth:`FreqMedCLIP.encode` gives the features (without gradients, possibly from a batched
  forward that already ran), and only :meth:`FreqMedCLIP.decode` of the explained row runs again, with S1 and F3
  as gradient leaves. That decoding is in fp32 even when the prediction used bf16/fp16 autocast: it is one row,
  and half-precision gradients would blur or underflow the maps. The backward (``torch.autograd.grad``) stops at
  the leaves and touches no parameter's ``.grad``. The target T is the *mean* fused logit L inside the predicted
  region (the whole image if nothing is predicted; such maps are flagged ``empty`` and the demo draws none).
* Two forms of each map: ``semantic`` / ``frequency`` min-max normalised to [0, 1] (pytorch-grad-cam's convention,
  what the paper's Fig. 3 shows; tested equal to ``pytorch_grad_cam.GradCAM``), and ``*_logit``, the raw
  ReLU(sum_c alpha_c A_c) in logit units of T. Since T is a mean, not a sum, the raw map does not grow with the
  region's area, so it is comparable across images; the demo draws it on the fixed scale ``GRADCAM_SCALE``.
* Other CAM methods (HiResCAM, Grad-CAM++, XGrad-CAM, LayerCAM, EigenCAM) come from pytorch-grad-cam through
  :class:`DecodeFromBottleneck`, which exposes S1 and F3 as modules; they cost one forward + backward per stream
  and are min-max normalised per image by the library (no fixed scale).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


GRID_TOKENS = 14 * 14      # bottleneck tokens (S1, F3 and FFBI's attention rows)
# The demo's fixed Grad-CAM colour scale, in logit units of the explained target T (mean fused logit in the
# predicted region): a token whose raw Grad-CAM reaches this value saturates the colour bar. Chosen from the
# shipped phantom checkpoints, whose raw maxima on the three examples and prompts "lesion" / their own lie between
# 0.0001 and 0.045: most of each logit arrives through the decoders' skips, little through the bottleneck tokens.
GRADCAM_SCALE = 0.05


@dataclass(frozen=True)
class StreamCAMs:
    """Per-stream Grad-CAM at the model's input size (H, W); a stream the variant lacks is None.

    Iterates as (semantic, frequency), the normalised maps.
    """

    semantic: np.ndarray | None              # (H, W) float32 in [0, 1], min-max normalised, on S1 (before FFBI)
    frequency: np.ndarray | None             # (H, W) float32 in [0, 1], min-max normalised, on F3 (before FFBI)
    semantic_logit: np.ndarray | None = None    # (H, W) float32 >= 0, raw map in logit units of T
    frequency_logit: np.ndarray | None = None   # (H, W) float32 >= 0
    empty: bool = False                      # nothing was predicted: the target fell back to the whole image

    def __iter__(self) -> Iterator[np.ndarray | None]:
        yield self.semantic
        yield self.frequency

    def __len__(self) -> int:
        return 2


def _raw_cam(activation: Tensor, gradient: Tensor, size: tuple[int, int]) -> Tensor:
    """activation, gradient: (1, C, 14, 14) -> ReLU(sum_c mean-gradient_c * A_c) bilinearly resized: (H, W)."""
    weights = gradient.mean((2, 3), keepdim=True)                                   # (1, C, 1, 1)
    cam = F.relu((weights * activation).sum(1, keepdim=True))                       # (1, 1, 14, 14)
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0].detach()


def _min_max(cam: Tensor) -> np.ndarray:
    cam = cam - cam.min()
    return (cam / cam.max().clamp_min(1e-12)).cpu().numpy()


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
        empty = bool(region.sum() == 0)
        if empty:
            region = torch.ones_like(region)
        target = (logits * region).sum() / region.sum()                            # T: mean fused logit in region
        gradients = torch.autograd.grad(target, list(leaves.values()), allow_unused=True)
    raw = {name: (_raw_cam(leaf, gradient, size) if gradient is not None else None)
           for (name, leaf), gradient in zip(leaves.items(), gradients, strict=True)}
    normalised = {name: None if cam is None else _min_max(cam) for name, cam in raw.items()}
    logit = {name: None if cam is None else cam.cpu().numpy() for name, cam in raw.items()}
    return StreamCAMs(normalised.get("semantic"), normalised.get("frequency"), logit.get("semantic"),
                      logit.get("frequency"), empty)


def _in_fp32(features: StreamFeatures) -> StreamFeatures:
    """The features in fp32, detached from any graph (the bottlenecks become gradient leaves; nothing is copied
    that is already fp32)."""
    def to_fp32(maps: tuple[Tensor, ...] | None) -> tuple[Tensor, ...] | None:
        return None if maps is None else tuple(m.detach().float() for m in maps)

    condition = None if features.condition is None else features.condition.detach().float()
    return StreamFeatures(to_fp32(features.semantic), to_fp32(features.frequency), condition)


def mean_cams(cams: Sequence[StreamCAMs]) -> StreamCAMs:
    """The ensemble's Grad-CAM: per stream, the mean of the members' maps (normalised maps: mean of the already
    min-max normalised maps; raw maps: mean in logit units). Empty when every member predicted nothing."""
    def mean(maps: list[np.ndarray | None]) -> np.ndarray | None:
        present = [m for m in maps if m is not None]
        return np.mean(present, axis=0).astype(np.float32) if present else None

    fields = ("semantic", "frequency", "semantic_logit", "frequency_logit")
    means = [mean([getattr(c, name) for c in cams]) for name in fields]
    return StreamCAMs(*means, empty=bool(cams) and all(c.empty for c in cams))


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


def attention_ratio(attention: np.ndarray) -> np.ndarray:
    """An attention row (14, 14) summing to 1 as a ratio to uniform attention (1/196): 1 = uniform, 2 = twice."""
    return (np.asarray(attention, dtype=np.float32) * attention.size).astype(np.float32)


# ---------------------------------------------------------------- pytorch-grad-cam methods

class DecodeFromBottleneck(nn.Module):
    """``image -> fused logits`` for one fixed prompt, with S1 and F3 passing through named modules
    (``semantic_tap``, ``frequency_tap``) so pytorch-grad-cam can hook them.

    The encoders run without gradients and S1 / F3 re-enter as gradient leaves, so the library differentiates the
    same path as :func:`features_gradcam` (the bottleneck and the decoders; not the FPN's S2-S4, not the frozen
    ViT, which would give the library no gradient at all). image: (B, 3, 224, 224) -> logits (B, 1, 224, 224).
    """

    def __init__(self, model: FreqMedCLIP, prompt: str, switches: Switches = ALL_ON) -> None:
        super().__init__()
        self.model, self.prompt, self.switches = model, prompt, switches
        self.semantic_tap, self.frequency_tap = nn.Identity(), nn.Identity()

    def forward(self, image: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.model.encode(image, [self.prompt] * len(image), self.switches)
        features = _in_fp32(features)
        semantic, frequency = features.semantic, features.frequency
        if semantic is not None:
            semantic = (self.semantic_tap(semantic[0].requires_grad_(True)), *semantic[1:])
        if frequency is not None and self.model.config.uses_frequency:
            frequency = (self.frequency_tap(frequency[0].requires_grad_(True)), *frequency[1:])
        with torch.enable_grad():
            return self.model.decode(StreamFeatures(semantic, frequency, features.condition),
                                     switches=self.switches).logits


# Display name -> pytorch-grad-cam class name: one table for the demo's choices and for the lazy import.
_LIBRARY_CAM_CLASSES = {"Grad-CAM (pytorch-grad-cam)": "GradCAM", "HiResCAM": "HiResCAM",
                        "Grad-CAM++": "GradCAMPlusPlus", "XGrad-CAM": "XGradCAM", "LayerCAM": "LayerCAM",
                        "EigenCAM": "EigenCAM"}
LIBRARY_CAM_METHODS = tuple(_LIBRARY_CAM_CLASSES)


def cam_methods() -> dict[str, type]:
    """The pytorch-grad-cam methods the demo offers, by display name (imported on first use)."""
    import pytorch_grad_cam

    return {name: getattr(pytorch_grad_cam, cls) for name, cls in _LIBRARY_CAM_CLASSES.items()}


def library_cams(model: FreqMedCLIP, image: Tensor, prompt: str, method: str,
                 switches: Switches = ALL_ON) -> StreamCAMs:
    """One pytorch-grad-cam method on both streams (one CAM object, forward and backward per stream).

    image: (1, 3, 224, 224) in [0, 1]. The target is the sum of the fused logits in the predicted region
    (``SemanticSegmentationTarget``; the whole image when nothing is predicted, flagged ``empty``); maps are the
    library's, min-max normalised per image, (224, 224). Leaves no parameter gradient behind.
    """
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    cam_class = cam_methods()[method]
    wrapped = DecodeFromBottleneck(model, prompt, switches)
    image = image.float()
    with torch.no_grad():
        region = (wrapped(image)[0, 0] > 0).float().cpu().numpy()
    empty = not region.any()
    target = [SemanticSegmentationTarget(0, np.ones_like(region) if empty else region)]
    taps = {"semantic": wrapped.semantic_tap if model.semantic is not None else None,
            "frequency": wrapped.frequency_tap if model.config.uses_frequency and switches.frequency else None}
    maps = {}
    try:
        for stream, tap in taps.items():
            if tap is None:
                maps[stream] = None
                continue
            with cam_class(model=wrapped, target_layers=[tap]) as cam:
                maps[stream] = cam(input_tensor=image, targets=target)[0].astype(np.float32)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return StreamCAMs(maps["semantic"], maps["frequency"], empty=empty)
