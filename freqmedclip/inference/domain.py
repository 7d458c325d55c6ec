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
  nearest domain, times ``MARGIN`` (1.1) (the shipped phantom reference was built with the distance to the image's
  own domain, the earlier rule, and not rebuilt). Both are stored in a small reference file made by this module's command, checked
  against the backbone's SHA-256. On the phantom benchmark with the mini CLIP: phantoms 0.5-1.8, noise ~5,
  smooth random colour textures 2.5-5.

Two more signals, stored only where the reference was built with them (``neighbours`` > 0; the phantom reference
predates them and uses the distance alone), because on the real-data backbone the token statistics of phantoms,
noise and smooth textures lie inside the real images' spread:

* **Nearest training images** (``similarity``): the mean cosine similarity of the image's CLIP embedding to its
  ``KNN`` (5) nearest stored training embeddings of a domain (up to 200 per domain, fp16), the best domain counts.
  *Outside* below the 0.5 % quantile of the validation images' (best-domain) similarity. It separates phantoms from
  real images but not noise or smooth textures, which this small CLIP embeds next to real images (cosine 0.8-0.99).
* **Pixel statistics** (``pixel_distance``): seven numbers the CLIP features miss (high-frequency energy fraction,
  chroma, intensity mean and std, total variation, channel correlation, dark fraction; :func:`pixel_statistics`),
  scaled by their spread over the stored training images; the distance is the mean distance to the ``KNN``
  nearest of a domain, the best domain counts. *Outside* above the 99.5 % quantile of the validation images'
  (best-domain) distance. Noise (high-frequency energy) and colour textures (decorrelated channels, no background)
  are far from every real domain; a gray smooth texture is not.

An image is outside when any stored signal says so. Limits: the reference knows only the images it was built from; an unseen scanner, contrast or anatomy that happens
to share their feature statistics passes, and an in-domain image with an unusual artefact may be flagged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
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
KNN = 5                  # neighbours averaged by the similarity and pixel signals
VAL_QUANTILE = 0.005     # the share of validation images each k-NN signal flags by construction
DARK = 0.04              # intensity below which a pixel counts as background


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


def pixel_statistics(image: Tensor) -> Tensor:
    """image: (B, 3, 224, 224) in [0, 1] -> (B, 7): log high-frequency energy fraction, chroma, mean, std, total
    variation, smallest channel correlation (1 for gray images) and dark fraction of the half-resolution image.

    Half resolution: the 224 input of a small upload is a bilinear upsampling whose top octave is empty, so the
    high-frequency fraction would measure the resize rather than the image."""
    x = F.avg_pool2d(image.float(), 2)
    gray = x.mean(1)                                                                       # (B, 112, 112)
    std = gray.std(dim=(1, 2), correction=0)
    spectrum = torch.fft.fft2(gray - gray.mean(dim=(1, 2), keepdim=True)).abs() ** 2
    frequency = torch.fft.fftfreq(gray.shape[-1], device=x.device)
    high = torch.hypot(frequency[:, None], frequency[None]) > 0.25                         # above half Nyquist
    high_fraction = spectrum[:, high].sum(1) / (spectrum.sum(dim=(1, 2)) + 1e-12)
    chroma = x.std(1, correction=0).mean(dim=(1, 2)) / (std + 1e-6)
    variation = (gray[..., 1:] - gray[..., :-1]).abs().mean(dim=(1, 2)) / (std + 1e-6)
    centred = x - x.mean(dim=(2, 3), keepdim=True)
    scale = centred.pow(2).mean(dim=(2, 3)).sqrt() + 1e-6                                  # (B, 3)
    pairs = [(centred[:, i] * centred[:, j]).mean(dim=(1, 2)) / (scale[:, i] * scale[:, j])
             for i, j in ((0, 1), (0, 2), (1, 2))]
    is_gray = x.std(1, correction=0).amax(dim=(1, 2)) < 1e-3
    correlation = torch.where(is_gray, torch.ones_like(std), torch.stack(pairs, 1).amin(1))
    dark = (gray < DARK).float().mean(dim=(1, 2))
    return torch.stack([high_fraction.clamp_min(1e-8).log(), chroma, gray.mean(dim=(1, 2)), std, variation,
                        correlation, dark], 1)


@torch.no_grad()
def _embedding_from_tokens(backbone: ClipBackbone, tokens: Tensor) -> Tensor:
    """The L2-normalised CLIP image embedding (B, E) of the ViT's last-block tokens."""
    pooled = backbone.visual.trunk.forward_head(tokens.to(next(backbone.visual.parameters()).dtype))
    return F.normalize(backbone.visual.head(pooled).float(), dim=-1)


def knn_similarity(embedding: np.ndarray, stored: np.ndarray, k: int = KNN) -> float:
    """Mean cosine similarity of an L2-normalised embedding (E,) to its ``k`` most similar rows of ``stored``
    (N, E), also L2-normalised (all of them when N < k)."""
    similarity = stored.astype(np.float32) @ embedding.astype(np.float32)
    return float(np.sort(similarity)[-k:].mean())


def knn_distance(statistics: np.ndarray, stored: np.ndarray, scale: np.ndarray, k: int = KNN) -> float:
    """Mean RMS distance, in units of ``scale``, of a pixel-statistics vector (P,) to its ``k`` nearest rows of
    ``stored`` (N, P)."""
    distance = np.sqrt((((stored - statistics[None]) / scale) ** 2).mean(1))
    return float(np.sort(distance)[:k].mean())


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
    embedding = _embedding_from_tokens(backbone, tokens)                                       # (1, E)
    similarity = embedding @ _caption_embeddings(backbone, domains).T                          # (1, K)
    probability = torch.softmax(backbone.logit_scale.exp().float() * similarity, dim=-1)[0]
    return {d: float(p) for d, p in zip(domains, probability, strict=True)}


def zero_shot(backbone: ClipBackbone, image: Tensor, domains: Sequence[str]) -> dict[str, float]:
    """image: (1, 3, 224, 224) -> {domain: probability} over the captions of ``domains`` (CLIP's softmax)."""
    return _zero_shot_from_tokens(backbone, _tokens(backbone, image), domains)


@dataclass(frozen=True)
class DomainReference:
    """Per training domain, the mean and std of :func:`token_statistics` and the distance threshold; optionally
    (``neighbours`` > 0 at build time) stored training embeddings and pixel statistics with their thresholds."""

    domains: tuple[str, ...]
    mean: np.ndarray          # (K, 2 D)
    std: np.ndarray           # (K, 2 D)
    threshold: float
    backbone_sha256: str
    source: str = ""          # what it was built from (data root, split, count)
    embeddings: np.ndarray | None = None          # (N, E) fp16, L2-normalised CLIP embeddings of training images
    pixels: np.ndarray | None = None              # (N, 7) their pixel_statistics
    neighbour_domain: np.ndarray | None = None    # (N,) index into domains
    pixel_scale: np.ndarray | None = None         # (7,) std of pixels over all stored images
    similarity_threshold: float | None = None
    pixel_threshold: float | None = None

    def distances(self, statistics: np.ndarray) -> dict[str, float]:
        """statistics: (2 D,) -> RMS z-score to each domain."""
        z = (statistics[None] - self.mean) / self.std
        return {d: float(v) for d, v in zip(self.domains, np.sqrt((z ** 2).mean(1)), strict=True)}

    @property
    def has_neighbours(self) -> bool:
        return self.embeddings is not None

    def similarities(self, embedding: np.ndarray) -> dict[str, float]:
        """embedding: (E,) L2-normalised -> k-NN cosine similarity to each domain's stored embeddings."""
        assert self.embeddings is not None and self.neighbour_domain is not None
        return {d: knn_similarity(embedding, self.embeddings[self.neighbour_domain == i])
                for i, d in enumerate(self.domains)}

    def pixel_distances(self, statistics: np.ndarray) -> dict[str, float]:
        """statistics: (7,) pixel_statistics -> k-NN distance to each domain's stored training images."""
        assert self.pixels is not None and self.neighbour_domain is not None and self.pixel_scale is not None
        return {d: knn_distance(statistics, self.pixels[self.neighbour_domain == i], self.pixel_scale)
                for i, d in enumerate(self.domains)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"domains": json.dumps(list(self.domains)), "threshold": repr(self.threshold),
                    "backbone_sha256": self.backbone_sha256, "source": self.source}
        tensors = {"mean": torch.from_numpy(self.mean), "std": torch.from_numpy(self.std)}
        if self.has_neighbours:
            metadata |= {"similarity_threshold": repr(self.similarity_threshold),
                         "pixel_threshold": repr(self.pixel_threshold), "knn": str(KNN)}
            tensors |= {"embeddings": torch.from_numpy(self.embeddings.astype(np.float16)),
                        "pixels": torch.from_numpy(self.pixels.astype(np.float32)),
                        "neighbour_domain": torch.from_numpy(self.neighbour_domain.astype(np.int64)),
                        "pixel_scale": torch.from_numpy(self.pixel_scale.astype(np.float32))}
        save_file(tensors, str(path), metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> DomainReference:
        with safe_open(str(path), "np") as f:
            meta = f.metadata()
            extra = {}
            if "embeddings" in f.keys():
                extra = {name: f.get_tensor(name) for name in ("embeddings", "pixels", "neighbour_domain",
                                                               "pixel_scale")}
                extra |= {"similarity_threshold": float(meta["similarity_threshold"]),
                          "pixel_threshold": float(meta["pixel_threshold"])}
            return cls(tuple(json.loads(meta["domains"])), f.get_tensor("mean"), f.get_tensor("std"),
                       float(meta["threshold"]), meta["backbone_sha256"], meta.get("source", ""), **extra)


@torch.no_grad()
def _signals(backbone: ClipBackbone, images: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """images: (N, 3, 224, 224) -> (token statistics, embeddings, pixel statistics), in chunks of 16."""
    stats, embeddings = [], []
    for chunk in images.split(16):
        tokens = _tokens(backbone, chunk)
        stats.append(_statistics(tokens))
        embeddings.append(_embedding_from_tokens(backbone, tokens))
    return torch.cat(stats).numpy(), torch.cat(embeddings).numpy(), pixel_statistics(images).numpy()


def build_reference(backbone: ClipBackbone, train: Mapping[str, Tensor], validation: Mapping[str, Tensor],
                    source: str = "", neighbours: int = 0) -> DomainReference:
    """train / validation: {domain: (N, 3, 224, 224) images in [0, 1]}; the threshold is MARGIN times the
    largest distance of a validation image to its nearest domain. With ``neighbours`` > 0 that many training images per
    domain (evenly spaced) are stored for the k-NN signals, thresholds at the validation quantile ``VAL_QUANTILE``."""
    domains = tuple(sorted(train))
    missing = sorted(set(domains) - {d for d, images in validation.items() if len(images)})
    unknown = sorted(set(validation) - set(domains))
    if missing or unknown:   # the threshold comes from validation images of every training domain, and only those
        raise ValueError(f"a domain reference needs validation images of every training domain and no other: "
                         f"missing {missing}, not in train {unknown}")
    signals = {d: _signals(backbone, train[d]) for d in domains}
    mean = np.stack([signals[d][0].mean(0) for d in domains]).astype(np.float32)
    std = np.stack([signals[d][0].std(0) + 1e-3 for d in domains]).astype(np.float32)
    reference = DomainReference(domains, mean, std, 0.0, backbone.weights_sha256, source)
    if neighbours > 0:
        # evenly spaced over the split, not its first rows: manifests are ordered by subject, and the first 200
        # slices of a few patients leave most validation images without a near neighbour
        chosen = {d: np.unique(np.linspace(0, len(train[d]) - 1, min(neighbours, len(train[d]))).round().astype(int))
                  for d in domains}
        pixels = np.concatenate([signals[d][2][chosen[d]] for d in domains]).astype(np.float32)
        reference = replace(
            reference,
            embeddings=np.concatenate([signals[d][1][chosen[d]] for d in domains]).astype(np.float16),
            pixels=pixels, pixel_scale=(pixels.std(0) + 1e-3).astype(np.float32),
            neighbour_domain=np.concatenate([np.full(len(chosen[d]), i, np.int64) for i, d in enumerate(domains)]))
    # each score as check_domain sees it: the best over all domains, since an image is outside only when it is far
    # from every one (a near-empty top-of-head MRI slice lies nearer lung CT than brain MRI, and is not outside)
    worst, similarities, pixel_distances = 0.0, [], []
    for images in validation.values():
        stats, embeddings, pixels = _signals(backbone, images)
        for row, embedding, pixel in zip(stats, embeddings, pixels, strict=True):
            worst = max(worst, min(reference.distances(row).values()))
            if reference.has_neighbours:
                similarities.append(max(reference.similarities(embedding).values()))
                pixel_distances.append(min(reference.pixel_distances(pixel).values()))
    thresholds = {}
    if reference.has_neighbours:
        thresholds = {"similarity_threshold": round(float(np.quantile(similarities, VAL_QUANTILE)), 3),
                      "pixel_threshold": round(float(np.quantile(pixel_distances, 1 - VAL_QUANTILE)), 3)}
    return replace(reference, threshold=round(MARGIN * worst, 3), **thresholds)


@dataclass(frozen=True)
class DomainCheck:
    """How an image relates to the training domains of the selected models."""

    nearest: str                        # the training domain at the smallest feature distance
    distance: float                     # that distance (RMS z-score)
    threshold: float
    zero_shot: dict[str, float]         # CLIP's zero-shot probabilities over the training domains' captions
    similarity: float | None = None     # best k-NN cosine similarity to a domain's training embeddings
    similarity_threshold: float | None = None
    pixel_distance: float | None = None  # smallest k-NN pixel-statistics distance to a domain's training images
    pixel_threshold: float | None = None
    most_similar: str | None = None     # the domain of the most similar training images (k-NN), where stored

    @property
    def likeliest(self) -> str:
        """The training domain the image most likely belongs to: that of its most similar training images where the
        reference stores them, else the nearest by feature statistics (on the real validation split the first is
        right for 580 of 588 images, the second for 546; ``freqmedclip.demo.domain_reference --check``)."""
        return self.most_similar or self.nearest

    @property
    def reasons(self) -> list[str]:
        """The signals that place the image outside: "distance", "similarity", "pixels"."""
        found = ["distance"] if self.distance > self.threshold else []
        if self.similarity is not None and self.similarity_threshold is not None \
                and self.similarity < self.similarity_threshold:
            found.append("similarity")
        if self.pixel_distance is not None and self.pixel_threshold is not None \
                and self.pixel_distance > self.pixel_threshold:
            found.append("pixels")
        return found

    @property
    def outside(self) -> bool:
        return bool(self.reasons)


def check_domain(backbone: ClipBackbone, reference: DomainReference, image: Tensor,
                 domains: Sequence[str] | None = None) -> DomainCheck:
    """image: (1, 3, 224, 224) in [0, 1]. ``domains``: the selected models' training domains (default: all the
    reference knows); domains the reference lacks are ignored for the distance."""
    known = [d for d in (domains or reference.domains) if d in reference.domains] or list(reference.domains)
    tokens = _tokens(backbone, image)                         # one ViT pass serves all CLIP signals
    distances = reference.distances(_statistics(tokens)[0].cpu().numpy())
    nearest = min(known, key=distances.__getitem__)
    extra = {}
    if reference.has_neighbours:
        similarities = reference.similarities(_embedding_from_tokens(backbone, tokens)[0].cpu().numpy())
        pixels = reference.pixel_distances(pixel_statistics(image)[0].cpu().numpy())
        most_similar = max(known, key=similarities.__getitem__)
        extra = {"similarity": similarities[most_similar], "most_similar": most_similar,
                 "similarity_threshold": reference.similarity_threshold,
                 "pixel_distance": min(pixels[d] for d in known), "pixel_threshold": reference.pixel_threshold}
    return DomainCheck(nearest, distances[nearest], reference.threshold,
                       _zero_shot_from_tokens(backbone, tokens, known), **extra)
