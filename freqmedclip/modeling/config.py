"""The model configuration: one small dataclass, saved inside every checkpoint.

Two presets share one code path and differ only in sizes:

* ``full`` - the paper: BiomedCLIP ViT-B/16 + PubMedBERT (frozen), ConvNeXt-Tiny frequency encoder.
* ``mini`` - the offline default: a 12-block ViT-Tiny with the same 14x14 token grid and a small BERT in
  BiomedCLIP's directory layout (pretrained by ``train.pretrain_clip`` on our phantoms), ConvNeXt-Atto.

Every ablation of Table 4 and every trainable baseline of Section 5.1 is a named variant: a set of field
overrides applied by :meth:`FreqMedCLIPConfig.from_preset`, never a fork of the model code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BIOMEDCLIP_HUB = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
MINI_BACKBONE_DIR = "assets/backbones/mini-clip-real"


@dataclass
class FreqMedCLIPConfig:
    """Hyper-parameters of one FreqMedCLIP model (see README, "Configuration")."""

    preset: str = "mini"
    variant: str = "full"
    backbone: str = f"local-dir:{MINI_BACKBONE_DIR}"     # hf-hub:ID or local-dir:PATH (BiomedCLIP layout)
    image_size: int = 224
    context_length: int = 77                           # prompts longer than this are truncated with a warning

    # Semantic stream (Section 3.4)
    semantic_layers: tuple[int, ...] = (3, 6, 9, 12)    # 1-based ViT blocks tapped, shallow to deep
    tca: str = "cross_attention"                        # "cross_attention" (Eq. 5-6) | "film" | "none"
    tca_width: int = 64                                 # bottleneck width of the adapter attention and FFN
    tca_heads: int = 4
    fpn_channels: tuple[int, int, int, int] = (128, 64, 32, 16)   # C1..C4 of S1 (14) .. S4 (112)

    # Frequency stream (Section 3.5)
    frequency_backbone: str = "convnext_atto"           # any timm ConvNeXt
    frequency_depths: tuple[int, int, int, int] | None = None   # blocks per stage; None: the timm model's own
    frequency_dims: tuple[int, int, int, int] | None = None     # channels per stage; None: the timm model's own
    frequency_weights: str = "auto"                      # "auto" (HF cache if present) | "none" | path to file
    freeze_frequency_backbone: bool = False

    # Which streams exist: "both" (FreqMedCLIP), "semantic", "frequency", or "unet" (UNet-CLIP baseline)
    streams: str = "both"
    unet_channels: tuple[int, int, int, int] = (32, 64, 128, 256)  # UNet-CLIP encoder at 112, 56, 28, 14

    # FFBI (Section 3.6)
    fusion: str = "ffbi"                                 # "ffbi" (Eq. 10-13) | "concat" (w/o FFBI ablation)
    fusion_width: int = 128                              # shared width d
    fusion_heads: int = 4
    text_gate: bool = True                               # Eq. 12

    # Decoders (Section 3.7-3.8)
    lffi: bool = True                                    # FiLM on the prompt at 28, 56 and 112 (Eq. 14-15)
    dual_decoder: bool = True
    decoder_channels: tuple[int, int, int] = (64, 32, 16)   # stage outputs at 28, 56, 112
    film_hidden: int = 128
    text_condition: str = "pooled"                       # "pooled" (t-bar, Eq. 3) | "clip" (joint embedding)

    # Loss (Section 3.9)
    bce_weight: float = 1.0                              # lambda
    semantic_aux_weight: float = 0.4                     # alpha
    frequency_aux_weight: float = 0.4                    # beta
    branch_bce: bool = False                             # also lambda * BCE on each branch (Eq. 20 has Dice only)
    bce_pos_weight: float = 1.0                          # weight of target pixels in every BCE (1: Eq. 20's plain BCE)

    def __post_init__(self) -> None:
        self.semantic_layers = tuple(self.semantic_layers)
        self.fpn_channels = tuple(self.fpn_channels)
        self.unet_channels = tuple(self.unet_channels)
        self.decoder_channels = tuple(self.decoder_channels)
        for name in ("frequency_depths", "frequency_dims"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
                if len(getattr(self, name)) != 4:
                    raise ValueError(f"config.{name} needs 4 values (one per ConvNeXt stage), got {getattr(self, name)}")
        checks = {
            "tca": ("cross_attention", "film", "none"),
            "streams": ("both", "semantic", "frequency", "unet"),
            "fusion": ("ffbi", "concat"),
            "text_condition": ("pooled", "clip"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if len(self.semantic_layers) != 4:
            raise ValueError(f"semantic_layers needs 4 block indices, got {self.semantic_layers}")
        if self.semantic_layers[0] < 1 or list(self.semantic_layers) != sorted(set(self.semantic_layers)):
            # SemanticEncoder runs the blocks before semantic_layers[0] without adapters: any other order
            # (e.g. the paper's deep-to-shallow {12, 9, 6, 3}) would silently skip adapters.
            raise ValueError(f"semantic_layers must be 1-based and strictly increasing (shallow to deep), "
                             f"got {self.semantic_layers}")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")

    @property
    def uses_semantic(self) -> bool:
        return self.streams in ("both", "semantic")

    @property
    def uses_frequency(self) -> bool:
        return self.streams in ("both", "frequency")

    @property
    def has_two_branches(self) -> bool:
        return self.streams == "both" and self.dual_decoder

    @property
    def loss_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`freqmedclip.modeling.losses.segmentation_loss` this config trains with."""
        return {"bce_weight": self.bce_weight, "semantic_weight": self.semantic_aux_weight,
                "frequency_weight": self.frequency_aux_weight, "branch_bce": self.branch_bce,
                "bce_pos_weight": self.bce_pos_weight}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FreqMedCLIPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}: was this checkpoint written by a newer version?")
        return cls(**values)

    @classmethod
    def from_preset(cls, preset: str = "mini", variant: str = "full", **overrides: Any) -> FreqMedCLIPConfig:
        """Build the config of a preset ("mini" | "full") and a named variant (see :data:`VARIANTS`)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
        values: dict[str, Any] = dict(PRESETS[preset], preset=preset, variant=variant)
        values.update(VARIANTS[variant])
        values.update(overrides)
        return cls(**values)


PRESETS: dict[str, dict[str, Any]] = {
    # ConvNeXt-Atto made shallower and narrower (timm's is depths (2, 2, 6, 2), dims (40, 80, 160, 320)): half the
    # cost of a training step on a CPU (README, "Where a training step goes"); no ImageNet weights fit it.
    "mini": dict(frequency_depths=(1, 1, 2, 1), frequency_dims=(24, 48, 96, 192)),
    "full": dict(
        backbone=BIOMEDCLIP_HUB,
        context_length=256,
        tca_width=32,          # keeps the adapters under 2 % of the trainable parameters, as the paper states
        tca_heads=4,
        fpn_channels=(256, 128, 64, 32),
        frequency_backbone="convnext_tiny",
        fusion_width=256,
        fusion_heads=8,
        decoder_channels=(128, 64, 32),
        film_hidden=256,
        unet_channels=(64, 128, 256, 512),
    ),
}

# Table 4 ablations and Section 5.1 baselines. "semantic_only" is the BiomedCLIP (Sem.) baseline: frozen
# ViT + FPN + one decoder, no adapters; it keeps the decoder's FiLM so that it can follow a prompt at all
# (our benchmark asks several questions of the same image). "no_freq" differs from it only by the TCA.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": dict(),
    "no_freq": dict(streams="semantic"),
    "no_ffbi": dict(fusion="concat"),
    "no_lffi": dict(lffi=False),
    "no_dual_decoder": dict(dual_decoder=False),
    "no_tca": dict(tca="none"),
    "tca_film": dict(tca="film"),
    "semantic_only": dict(streams="semantic", tca="none"),
    "frequency_only": dict(streams="frequency"),
    "unet_clip": dict(streams="unet", text_condition="clip"),
}
