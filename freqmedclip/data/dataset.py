"""Torch Dataset over the on-disk format, with paired augmentation and balanced sampling (paper §4).

Notable choices:
- Image and mask go through ONE ``grid_sample`` call on a stacked tensor, so flips, rotation,
  scaling and translation are geometrically identical for both; the mask is resampled bilinearly
  and re-thresholded at 0.5, which keeps thin and small structures better than nearest-neighbour.
- Intensity jitter (brightness, contrast, gamma, Gaussian noise) touches the image only, after
  the geometric step.
- All randomness comes from torch's RNG, which the DataLoader seeds per worker; a training item
  samples one prompt phrasing, evaluation always uses ``prompts[0]`` so metrics are deterministic.
- ``spacing`` is reported at the 224 grid: stored spacing x stored size / 224, divided by the
  augmentation zoom (a zoom of 1.1 makes each output pixel cover 1/1.1 of the distance).
- Class imbalance (paper §4: "balanced sampling") is handled by ``sampling_weights``, which gives
  every (dataset, positive) group the same total probability mass.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from freqmedclip.data.format import StructureRecord, load_image, load_mask, read_manifest

IMAGE_SIZE = 224
# In-domain negatives: phrases that name nothing in any of our images. A training item whose prompt is replaced by
# one of them (``unrelated_prompts``) gets an empty target, so the model learns that the right image with the wrong
# words means "absent". ``train.evaluate`` checks other phrases, never trained on (a test keeps the sets disjoint).
UNRELATED_TRAIN_PROMPTS = (
    "kidney", "liver", "heart", "femur", "spleen", "tooth", "retinal vessels", "kidney stone", "fractured rib",
    "a cat", "a red car", "a tree", "the sky", "a keyboard", "a cup of coffee", "a dog playing in the park",
    "handwritten text", "the sun", "a chessboard", "an umbrella",
)


@dataclass
class Augment:
    """Augmentation strengths; probabilities are per item, ranges are sampled uniformly."""

    hflip: float = 0.5
    vflip: float = 0.5
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05  # fraction of the image side
    brightness: float = 0.1  # additive, in [0, 1] intensity units
    contrast: float = 0.15  # multiplicative around the image mean
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.02

    @classmethod
    def geometric_only(cls) -> Augment:
        return cls(brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), noise_std=0.0)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _affine_theta(aug: Augment) -> tuple[Tensor, float]:
    """Random output->input affine (2, 3) in normalised coordinates, and the zoom factor."""
    angle = math.radians(_uniform(-aug.rotate_deg, aug.rotate_deg))
    zoom = _uniform(*aug.scale)
    sx = -1.0 if torch.rand(()).item() < aug.hflip else 1.0
    sy = -1.0 if torch.rand(()).item() < aug.vflip else 1.0
    tx, ty = (_uniform(-2 * aug.translate, 2 * aug.translate) for _ in range(2))
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos * sx, -sin * sy, tx], [sin * sx, cos * sy, ty]], dtype=torch.float32)
    return theta, zoom


def paired_transform(
    image: Tensor, mask: Tensor, theta: Tensor | None, size: int = IMAGE_SIZE
) -> tuple[Tensor, Tensor]:
    """Resample image (3, H, W) and mask (1, H, W) with the same affine onto a (size, size) grid.

    ``theta`` is the (2, 3) output->input affine of ``F.affine_grid``; None = plain resize.
    Returns image (3, size, size) float and mask (1, size, size) in {0, 1}.
    """
    if theta is None and image.shape[-2:] == (size, size):
        return image, mask
    stacked = torch.cat([image, mask], dim=0)[None]  # (1, 4, H, W)
    if theta is None:
        out = F.interpolate(stacked, size=(size, size), mode="bilinear", align_corners=False)
    else:
        grid = F.affine_grid(theta[None], [1, stacked.shape[1], size, size], align_corners=False)
        out = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0, :3], (out[0, 3:] > 0.5).float()


def intensity_jitter(image: Tensor, aug: Augment) -> Tensor:
    """Brightness/contrast/gamma/noise on an image (3, H, W) in [0, 1]; same shape, clamped to [0, 1]."""
    if aug.gamma != (1.0, 1.0):
        image = image.clamp(0, 1) ** _uniform(*aug.gamma)
    if aug.contrast:
        mean = image.mean()
        image = (image - mean) * _uniform(1 - aug.contrast, 1 + aug.contrast) + mean
    if aug.brightness:
        image = image + _uniform(-aug.brightness, aug.brightness)
    if aug.noise_std:
        image = image + torch.randn_like(image) * _uniform(0, aug.noise_std)
    return image.clamp(0, 1)


class SegmentationDataset(Dataset):
    """(image, prompt) -> mask items from a dataset root written by ``freqmedclip.data.format``.

    Items: {"image": (3, 224, 224) float in [0, 1], "mask": (1, 224, 224) float in {0, 1},
    "prompt": str, "spacing": (2,) float mm at the 224 grid, "sample_id", "subject_id", "dataset",
    "structure": str ("unrelated" for a replaced prompt), "index": int}. ``unrelated_prompts`` (train only): the
    probability that an item's prompt is replaced by one of :data:`UNRELATED_TRAIN_PROMPTS` with an empty mask.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None,
        train: bool,
        datasets: Sequence[str] | None = None,
        augment: Augment | bool | None = None,
        structures: Sequence[str] | None = None,
        image_size: int = IMAGE_SIZE,
        unrelated_prompts: float = 0.0,
    ) -> None:
        if not 0.0 <= unrelated_prompts <= 1.0:
            raise ValueError(f"unrelated_prompts is a probability, got {unrelated_prompts}")
        if unrelated_prompts and not train:
            raise ValueError("unrelated_prompts replaces training prompts only; evaluation keeps the records' own")
        self.root = Path(root)
        self.unrelated_prompts = unrelated_prompts
        self.train = train
        self.image_size = image_size
        if augment is None:
            augment = train
        self.augment = Augment() if augment is True else (augment or None)
        records = read_manifest(self.root)
        self.records = [
            r
            for r in records
            if (split is None or r.split == split)
            and (datasets is None or r.dataset in datasets)
            and (structures is None or r.structure in structures)
        ]
        if not self.records:
            raise ValueError(
                f"no records in {self.root} for split={split!r} datasets={datasets} structures={structures}"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image = torch.from_numpy(load_image(self.root, rec)).permute(2, 0, 1).float() / 255.0
        mask = torch.from_numpy(load_mask(self.root, rec))[None].float()
        h, w = image.shape[-2:]
        spacing = torch.tensor(rec.spacing_mm, dtype=torch.float32) * torch.tensor([h, w]) / self.image_size
        theta = None
        if self.augment is not None:
            theta, zoom = _affine_theta(self.augment)
            spacing = spacing / zoom
        image, mask = paired_transform(image, mask, theta, self.image_size)
        if self.augment is not None:
            image = intensity_jitter(image, self.augment)
        structure = rec.structure
        if self.train and len(rec.prompts) > 1:
            prompt = rec.prompts[int(torch.randint(len(rec.prompts), ()).item())]
        else:
            prompt = rec.prompts[0]
        if self.unrelated_prompts and torch.rand(()).item() < self.unrelated_prompts:
            prompt = UNRELATED_TRAIN_PROMPTS[int(torch.randint(len(UNRELATED_TRAIN_PROMPTS), ()).item())]
            mask, structure = torch.zeros_like(mask), "unrelated"
        return {
            "image": image,
            "mask": mask,
            "prompt": prompt,
            "spacing": spacing,
            "sample_id": rec.sample_id,
            "subject_id": rec.subject_id,
            "dataset": rec.dataset,
            "structure": structure,
            "index": index,
        }


def sampling_weights(records: Sequence[StructureRecord], by: Sequence[str] = ("dataset", "positive")) -> Tensor:
    """Per-record weights (N,) float64 for ``WeightedRandomSampler``: every group of records sharing
    the attributes ``by`` gets the same total weight, so groups are drawn equally often."""
    keys = [tuple(getattr(r, attr) for attr in by) for r in records]
    counts = Counter(keys)
    weights = np.array([1.0 / counts[k] for k in keys], dtype=np.float64)
    return (
        torch.from_numpy(weights / weights.sum() * len(weights))
        if len(weights)
        else torch.zeros(0, dtype=torch.float64)
    )
