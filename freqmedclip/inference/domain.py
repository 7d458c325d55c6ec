"""Does an image look like anything the models were trained on? The frozen CLIP backbone's own view of it.

The reference file is made by ``python -m freqmedclip.demo.domain_reference`` (the data side lives in the demo
layer: this module imports ``modeling`` only).

Two signals from the CLIP backbone every checkpoint shares:

* **Zero-shot domain** (what ``train.pretrain_clip`` evaluates): cosine similarity of the image embedding to one
  caption per training domain (``DOMAIN_CAPTIONS``, e.g. "lung CT"), softmax with CLIP's logit scale. It names the
  nearest known domain, but it cannot say "none of them": a softmax over the known captions always picks one
  (the mini CLIP puts pure noise and smooth colour textures next to "mammogram", cosine 0.39-0.48, like real
  phantom mammograms).
* **Distance to the training images' features**: per domain, the mean and standard deviation of the ViT's
  token-feature statistics (mean and std over the 196 patch tokens of each of the D channels, a 2D vector) over
  the training split; an image's distance to a domain is the RMS z-score of its vector, and it is *outside* when
  its distance to every training domain exceeds the threshold: the largest distance of any validation image to its
  own domain, times ``MARGIN`` (1.1). Both are stored in a small reference file made by this module's command, checked
  against the backbone's SHA-256. On the phantom benchmark with the mini CLIP: phantoms 0.5-1.8, noise ~5,
  smooth random colour textures 2.5-5.

Limits: the reference knows only the images it was built from; an unseen scanner, contrast or anatomy that happens
to share their feature statistics passes, and an in-domain image with an unusual artefact may be flagged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from freqmedclip.modeling.backbone import ClipBackbone

# The caption style of ``train.pretrain_clip.DOMAIN_PROMPTS``, by dataset name (phantom and real sources).
DOMAIN_CAPTIONS = {"brain": "brain MRI", "brats": "brain MRI", "lgg": "brain MRI", "breast": "mammogram",
                   "cbis_ddsm": "mammogram", "busbra": "breast ultrasound", "lung": "lung CT", "luna16": "lung CT",
                   "lidc": "lung CT", "shapes": "shapes"}
MARGIN = 1.1


def caption_for(domain: str) -> str:
    """The zero-shot caption of a dataset name (the name itself when unknown)."""
    return DOMAIN_CAPTIONS.get(domain, domain.replace("_", " "))


def _clip_input(backbone: ClipBackbone, image: Tensor) -> Tensor:
    mean = image.new_tensor(backbone.preprocess.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
    std = image.new_tensor(backbone.preprocess.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
    return (image.float() - mean) / std


@torch.no_grad()
def _tokens(backbone: ClipBackbone, image: Tensor) -> Tensor:
    """image: (B, 3, 224, 224) in [0, 1] -> the ViT's last-block tokens (B, 1 + 196, D)."""
    return backbone.visual.trunk.forward_features(_clip_input(backbone, image)).float()


def _statistics(tokens: Tensor) -> Tensor:
    patches = tokens[:, 1:]
    return torch.cat([patches.mean(1), patches.std(1)], dim=1)


def token_statistics(backbone: ClipBackbone, image: Tensor) -> Tensor:
    """image: (B, 3, 224, 224) in [0, 1] -> (B, 2 D): mean and std over the patch tokens of the ViT's last block."""
    return _statistics(_tokens(backbone, image))


_CAPTION_CACHE: dict[tuple[str, tuple[str, ...]], Tensor] = {}


@torch.no_grad()
def _caption_embeddings(backbone: ClipBackbone, domains: Sequence[str]) -> Tensor:
    """L2-normalised text embeddings (K, E) of the domains' captions, cached per backbone and domain list."""
    key = (backbone.weights_sha256, tuple(domains))
    if key not in _CAPTION_CACHE:
        tokens = backbone.tokenizer([caption_for(d) for d in domains], padding="longest", return_tensors="pt")
        device = next(backbone.text.parameters()).device
        _CAPTION_CACHE[key] = F.normalize(backbone.text(tokens["input_ids"].to(device)).float(), dim=-1)
    return _CAPTION_CACHE[key]


@torch.no_grad()
def _zero_shot_from_tokens(backbone: ClipBackbone, tokens: Tensor, domains: Sequence[str]) -> dict[str, float]:
    pooled = backbone.visual.trunk.forward_head(tokens.to(next(backbone.visual.parameters()).dtype))
    embedding = F.normalize(backbone.visual.head(pooled).float(), dim=-1)                      # (1, E)
    similarity = embedding @ _caption_embeddings(backbone, domains).T                          # (1, K)
    probability = torch.softmax(backbone.logit_scale.exp().float() * similarity, dim=-1)[0]
    return {d: float(p) for d, p in zip(domains, probability, strict=True)}


def zero_shot(backbone: ClipBackbone, image: Tensor, domains: Sequence[str]) -> dict[str, float]:
    """image: (1, 3, 224, 224) -> {domain: probability} over the captions of ``domains`` (CLIP's softmax)."""
    return _zero_shot_from_tokens(backbone, _tokens(backbone, image), domains)


@dataclass(frozen=True)
class DomainReference:
    """Per training domain, the mean and std of :func:`token_statistics` and the distance threshold."""

    domains: tuple[str, ...]
    mean: np.ndarray          # (K, 2 D)
    std: np.ndarray           # (K, 2 D)
    threshold: float
    backbone_sha256: str
    source: str = ""          # what it was built from (data root, split, count)

    def distances(self, statistics: np.ndarray) -> dict[str, float]:
        """statistics: (2 D,) -> RMS z-score to each domain."""
        z = (statistics[None] - self.mean) / self.std
        return {d: float(v) for d, v in zip(self.domains, np.sqrt((z ** 2).mean(1)), strict=True)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"domains": json.dumps(list(self.domains)), "threshold": repr(self.threshold),
                    "backbone_sha256": self.backbone_sha256, "source": self.source}
        save_file({"mean": torch.from_numpy(self.mean), "std": torch.from_numpy(self.std)}, str(path), metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> DomainReference:
        with safe_open(str(path), "np") as f:
            meta = f.metadata()
            return cls(tuple(json.loads(meta["domains"])), f.get_tensor("mean"), f.get_tensor("std"),
                       float(meta["threshold"]), meta["backbone_sha256"], meta.get("source", ""))


def build_reference(backbone: ClipBackbone, train: Mapping[str, Tensor], validation: Mapping[str, Tensor],
                    source: str = "") -> DomainReference:
    """train / validation: {domain: (N, 3, 224, 224) images in [0, 1]}; the threshold is MARGIN times the
    largest distance of a validation image to its own domain."""
    domains = tuple(sorted(train))
    missing = sorted(set(domains) - {d for d, images in validation.items() if len(images)})
    unknown = sorted(set(validation) - set(domains))
    if missing or unknown:   # the threshold comes from validation images of every training domain, and only those
        raise ValueError(f"a domain reference needs validation images of every training domain and no other: "
                         f"missing {missing}, not in train {unknown}")
    stats = {d: torch.cat([token_statistics(backbone, chunk) for chunk in train[d].split(16)]).numpy()
             for d in domains}
    mean = np.stack([stats[d].mean(0) for d in domains]).astype(np.float32)
    std = np.stack([stats[d].std(0) + 1e-3 for d in domains]).astype(np.float32)
    reference = DomainReference(domains, mean, std, 0.0, backbone.weights_sha256, source)
    worst = 0.0
    for d, images in validation.items():
        for row in torch.cat([token_statistics(backbone, chunk) for chunk in images.split(16)]).numpy():
            worst = max(worst, reference.distances(row)[d])
    return DomainReference(domains, mean, std, round(MARGIN * worst, 3), backbone.weights_sha256, source)


@dataclass(frozen=True)
class DomainCheck:
    """How an image relates to the training domains of the selected models."""

    nearest: str                        # the training domain at the smallest feature distance
    distance: float                     # that distance (RMS z-score)
    threshold: float
    zero_shot: dict[str, float]         # CLIP's zero-shot probabilities over the training domains' captions

    @property
    def outside(self) -> bool:
        return self.distance > self.threshold


def check_domain(backbone: ClipBackbone, reference: DomainReference, image: Tensor,
                 domains: Sequence[str] | None = None) -> DomainCheck:
    """image: (1, 3, 224, 224) in [0, 1]. ``domains``: the selected models' training domains (default: all the
    reference knows); domains the reference lacks are ignored for the distance."""
    known = [d for d in (domains or reference.domains) if d in reference.domains] or list(reference.domains)
    tokens = _tokens(backbone, image)                         # one ViT pass serves both signals
    distances = reference.distances(_statistics(tokens)[0].cpu().numpy())
    nearest = min(known, key=distances.__getitem__)
    return DomainCheck(nearest, distances[nearest], reference.threshold, _zero_shot_from_tokens(backbone, tokens, known))
