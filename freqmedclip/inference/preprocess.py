"""Input processing (Section 3.2): validation, per-modality normalisation to [0, 1], resizing to 224.

Modalities (the same conventions as the dataset converters):

* ``"MRI"``: z-score within the foreground (non-zero pixels), clipped to [-3, 3], mapped to [0, 1].
* ``"CT"``: a Hounsfield window (a preset name or ``(level, width)``) when given, min-max otherwise.
* ``"MG"`` (mammography): clipped to the 0.5-99.5 percentiles, then min-max (as the CBIS-DDSM converter).
* ``"US"`` (ultrasound): the same percentile clip then min-max (as the BUS-BRA converter in
  ``freqmedclip.data.public.breast``): B-mode speckle has no physical unit, and the clip keeps burned-in
  white scanner text and caliper marks from setting the maximum.
* ``"auto"``: images that are already display images (8-bit: / 255; 16-bit and float: min-max).

Bad input raises :class:`InputError` with a message that names the problem.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MIN_SIDE = 32
DEFAULT_MAX_PIXELS = 8192 * 8192
WINDOW_PRESETS: dict[str, tuple[float, float]] = {    # (level, width) in HU
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
MODALITIES = ("auto", "MRI", "CT", "MG", "US")
PERCENTILE_CLIP = (0.5, 99.5)    # MG and US: robust range before min-max


class InputError(ValueError):
    """An input image the model cannot use; the message says why."""


def validate_image(image: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Check an image array and return it as (H, W, C) with C = 1 or 3 (alpha dropped)."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"expected a numpy array or PIL image, got {type(image).__name__}")
    if image.dtype == bool or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise InputError(f"unsupported pixel type {image.dtype}; use integer or floating-point pixels")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise InputError(f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4); got {image.shape}")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise InputError(f"image is {height}x{width} px; both sides must be at least {MIN_SIDE} px")
    if height * width > max_pixels:
        raise InputError(f"image is {height}x{width} = {height * width:,} px, over the limit of {max_pixels:,} px")
    if image.shape[-1] == 4:
        image = image[..., :3]
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise InputError("image contains NaN or infinite pixels")
    return image


def _min_max(x: np.ndarray) -> np.ndarray:
    low, high = float(x.min()), float(x.max())
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


def normalize(image: np.ndarray, modality: str = "auto", window: str | tuple[float, float] | None = None) -> np.ndarray:
    """Per-modality normalisation. image: (H, W, C) -> float32 (H, W, C) in [0, 1]."""
    if modality not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    x = image.astype(np.float32)
    if modality == "MRI":
        out = np.empty_like(x)
        for c in range(x.shape[-1]):  # z-score each contrast within the brain (non-zero pixels)
            channel = x[..., c]
            foreground = channel[channel != 0]
            if foreground.size < 2 or foreground.std() == 0:
                out[..., c] = 0.0
                continue
            z = np.clip((channel - foreground.mean()) / foreground.std(), -3.0, 3.0)
            out[..., c] = np.where(channel != 0, (z + 3.0) / 6.0, 0.0)
        return out
    if modality == "CT" and window is not None:
        if isinstance(window, str):
            if window not in WINDOW_PRESETS:
                raise InputError(f"unknown CT window {window!r}; presets: {sorted(WINDOW_PRESETS)}")
            window = WINDOW_PRESETS[window]
        level, width = window
        return np.clip((x - (level - width / 2)) / width, 0.0, 1.0)
    if modality in ("MG", "US"):
        low, high = np.percentile(x, PERCENTILE_CLIP)
        return _min_max(np.clip(x, low, high))
    if modality == "auto" and image.dtype == np.uint8:
        return x / 255.0
    return _min_max(x)


def to_model_input(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """(H, W, C) float in [0, 1] -> (1, 3, size, size) float32, bilinear with anti-aliasing."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def resize_to(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear rescale of (B, 1, h, w) maps to the original (H, W) (Section 3.2)."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
