"""FreqMedCLIP (Section 3.1): the wiring of the paper's pipeline, Eq. 1-2, and :func:`build_model`.

``forward`` reads like the pipeline equations. It returns the fused logits and both branch logits, so deep
supervision (Eq. 20) and the explanations need no hooks into internals. Ablations and baselines are the same
class with other config values (see :mod:`freqmedclip.modeling.config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from freqmedclip.modeling.backbone import ClipBackbone, create_frequency_backbone, load_clip_backbone, random_clip_backbone
from freqmedclip.modeling.config import FreqMedCLIPConfig
from freqmedclip.modeling.decoder import Decoder, FusionHead
from freqmedclip.modeling.frequency import FrequencyEncoder, UNetEncoder
from freqmedclip.modeling.fusion import ConcatFusion, CrossStreamFusion, SingleStreamBottleneck
from freqmedclip.modeling.semantic import SemanticEncoder
from freqmedclip.modeling.text import TextEncoder, TextFeatures


class SegOutput(NamedTuple):
    """Logits at the input resolution; a branch is None when the variant has no such branch."""

    logits: Tensor                        # (B, 1, H, W) fused L (Eq. 18)
    semantic_logits: Tensor | None        # (B, 1, H, W) L_s
    frequency_logits: Tensor | None       # (B, 1, H, W) L_f
    semantic_attention: Tensor | None = None    # (B, 196, 196) FFBI, semantic queries -> frequency keys
    frequency_attention: Tensor | None = None   # (B, 196, 196) FFBI, frequency queries -> semantic keys


class StreamFeatures(NamedTuple):
    """What the encoders hand to the fusion and the decoders, bottleneck first; a stream is None when absent.

    Splitting :meth:`FreqMedCLIP.forward` here lets Grad-CAM differentiate the decoders alone, from features the
    batched forward already computed.
    """

    semantic: tuple[Tensor, ...] | None    # S1, S2, S3, S4: (B, C_s, 14, 14), 28, 56, 112
    frequency: tuple[Tensor, ...] | None   # F3, F2, F1, F_stem: (B, C_f3, 14, 14), 28, 56, 112
    condition: Tensor | None               # (B, d_t) pooled prompt or (B, d_clip) CLIP embedding; None with FiLM off

    def row(self, index: int) -> StreamFeatures:
        """The features of batch row ``index`` (batch size 1), as views."""
        rows = len(self.condition if self.condition is not None else (self.semantic or self.frequency)[0])
        if not 0 <= index < rows:
            raise IndexError(f"row {index} of a batch of {rows}")

        def pick(maps: tuple[Tensor, ...] | None) -> tuple[Tensor, ...] | None:
            return None if maps is None else tuple(m[index:index + 1] for m in maps)

        condition = None if self.condition is None else self.condition[index:index + 1]
        return StreamFeatures(pick(self.semantic), pick(self.frequency), condition)


class Switches(NamedTuple):
    """Inference-time component switches (the demo's ablation toggles); training always uses all on.

    frequency=False zeroes the frequency features and, with two decoders, returns the semantic branch alone;
    ffbi=False skips the bottleneck exchange (each stream keeps its own tokens); film=False skips every FiLM
    and the FFBI text gate (the adapters inside the ViT still read the prompt).
    """

    frequency: bool = True
    ffbi: bool = True
    film: bool = True


ALL_ON = Switches()


class FreqMedCLIP(nn.Module):
    """Text-guided dual-stream segmentation model.

    Args:
        config: the model's :class:`FreqMedCLIPConfig`.
        backbone: a frozen CLIP backbone (BiomedCLIP or the mini stand-in); may be shared by several models.
        frequency_backbone: a timm ConvNeXt with a 1x1 stride-1 stem (None when the variant has no
            frequency stream).
    """

    def __init__(self, config: FreqMedCLIPConfig, backbone: ClipBackbone,
                 frequency_backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.clip_backbone = backbone  # a plain reference (not a submodule) so ensembles can share it
        self.backbone_source = backbone.source
        self.backbone_sha256 = backbone.weights_sha256
        self.text = TextEncoder(backbone.text, backbone.tokenizer, config.context_length)
        mean = torch.tensor(backbone.preprocess.get("mean", (0.5, 0.5, 0.5)))
        std = torch.tensor(backbone.preprocess.get("std", (0.5, 0.5, 0.5)))
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1), persistent=False)
        condition_dim = self.text.width if config.text_condition == "pooled" else self.text.embedding_width
        film_dim = condition_dim if config.lffi else None
        gate_dim = condition_dim if config.text_gate else None
        width, decoder_channels = config.fusion_width, config.decoder_channels

        self.semantic = self.frequency = self.semantic_decoder = self.frequency_decoder = None
        self.fusion = self.head = None
        if config.uses_semantic:
            self.semantic = SemanticEncoder(backbone.visual.trunk, self.text.width, config.semantic_layers,
                                            config.tca, config.tca_width, config.tca_heads, config.fpn_channels)
            semantic_channels = config.fpn_channels
        if config.streams == "unet":
            self.frequency = UNetEncoder(config.unet_channels)
        elif config.uses_frequency:
            if frequency_backbone is None:
                raise ValueError(f"variant {config.variant!r} needs a frequency backbone")
            self.frequency = FrequencyEncoder(frequency_backbone)
            if config.freeze_frequency_backbone:
                frequency_backbone.requires_grad_(False)
                frequency_backbone.stem.requires_grad_(True)  # the stem is new: it reads sub-bands
        if self.frequency is not None:
            frequency_channels = tuple(reversed(self.frequency.channels))                  # F3, F2, F1, F_stem

        if config.streams == "both":
            fusion_cls = CrossStreamFusion if config.fusion == "ffbi" else ConcatFusion
            extra = (config.fusion_heads,) if config.fusion == "ffbi" else ()
            self.fusion = fusion_cls(semantic_channels[0], frequency_channels[0], width, *extra, gate_dim)
            if config.dual_decoder:
                self.semantic_decoder = Decoder(width, semantic_channels[1:], decoder_channels, film_dim,
                                                config.film_hidden)
                self.frequency_decoder = Decoder(width, frequency_channels[1:], decoder_channels, film_dim,
                                                 config.film_hidden)
                self.head = FusionHead()
            else:
                skips = tuple(s + f for s, f in zip(semantic_channels[1:], frequency_channels[1:]))
                self.semantic_decoder = Decoder(2 * width, skips, decoder_channels, film_dim, config.film_hidden)
        else:
            channels = semantic_channels if config.uses_semantic else frequency_channels
            self.fusion = SingleStreamBottleneck(channels[0], width, gate_dim)
            decoder = Decoder(width, channels[1:], decoder_channels, film_dim, config.film_hidden)
            if config.uses_semantic:
                self.semantic_decoder = decoder
            else:
                self.frequency_decoder = decoder

    def encode_text(self, prompts: Sequence[str] | TextFeatures) -> TextFeatures:
        return prompts if isinstance(prompts, TextFeatures) else self.text(prompts)

    def forward(self, image: Tensor, prompts: Sequence[str] | TextFeatures, return_attention: bool = False,
                switches: Switches = ALL_ON) -> SegOutput:
        """image: (B, 3, H, W) in [0, 1], H = W = config.image_size; prompts: B strings (or encoded)."""
        return self.decode(self.encode(image, prompts, switches), return_attention, switches)

    def encode(self, image: Tensor, prompts: Sequence[str] | TextFeatures,
               switches: Switches = ALL_ON) -> StreamFeatures:
        """Both streams' multi-scale features and the prompt condition (Eq. 3-9); shapes in :class:`StreamFeatures`."""
        text = self.encode_text(prompts)                                            # T (B, L, d_t), t-bar (B, d_t)
        if len(text.pooled) != len(image):
            raise ValueError(f"got {len(image)} images but {len(text.pooled)} prompts")
        condition = text.pooled if self.config.text_condition == "pooled" else text.embedding
        # One image expanded over several prompts (Predictor.predict_tensor): the streams see it once and run
        # their prompt-independent parts once (the whole frequency stream, the ViT blocks before the first TCA).
        shared = len(image) > 1 and image.stride(0) == 0
        x = ((image[:1] if shared else image) - self.pixel_mean) / self.pixel_std     # (B or 1, 3, 224, 224)
        semantic = frequency = None
        if self.semantic is not None:
            semantic = tuple(self.semantic(x, text))                  # S1..S4 at 14, 28, 56, 112   Eq. 4-7
        if self.frequency is not None:
            f_stem, f1, f2, f3 = (f.expand(len(image), -1, -1, -1) for f in self.frequency(x))  # 112..14  Eq. 8-9
            frequency = (f3, f2, f1, f_stem)
            if not switches.frequency:
                frequency = tuple(torch.zeros_like(f) for f in frequency)
        return StreamFeatures(semantic, frequency, condition if switches.film else None)

    def decode(self, features: StreamFeatures, return_attention: bool = False,
               switches: Switches = ALL_ON) -> SegOutput:
        """Fusion at the bottleneck and the decoders (Eq. 10-18): logits at the input resolution."""
        condition = features.condition
        if self.config.streams != "both":
            if self.semantic is not None:
                s1, skips = features.semantic[0], features.semantic[1:]
                logits = self.semantic_decoder(self.fusion(s1, condition), skips, condition)
                return SegOutput(logits, logits, None)
            f3, skips = features.frequency[0], features.frequency[1:]
            logits = self.frequency_decoder(self.fusion(f3, condition), skips, condition)
            return SegOutput(logits, None, logits)

        (s1, s2, s3, s4), (f3, f2, f1, f_stem) = features.semantic, features.frequency
        exchange = switches.ffbi and switches.frequency
        d_s, d_f, attention_s, attention_f = self.fusion(s1, f3, condition, return_attention, exchange)  # Eq. 10-13
        if not self.config.dual_decoder:
            skips = (torch.cat([s2, f2], 1), torch.cat([s3, f1], 1), torch.cat([s4, f_stem], 1))
            logits = self.semantic_decoder(torch.cat([d_s, d_f], 1), skips, condition)
            return SegOutput(logits, None, None, attention_s, attention_f)
        semantic_logits = self.semantic_decoder(d_s, (s2, s3, s4), condition)          # L_s  Eq. 16
        frequency_logits = self.frequency_decoder(d_f, (f2, f1, f_stem), condition)    # L_f  Eq. 17
        logits = self.head(torch.cat([semantic_logits, frequency_logits], 1))          # L    Eq. 18
        if not switches.frequency:
            logits = semantic_logits
        return SegOutput(logits, semantic_logits, frequency_logits, attention_s, attention_f)

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the frozen CLIP backbone (never saved in our checkpoints)."""
        return ("text.clip_text.", "semantic.trunk.")

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything but the frozen CLIP backbone: what a checkpoint stores."""
        frozen = self.frozen_prefixes()
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}


def build_model(config: FreqMedCLIPConfig, backbone: ClipBackbone | None = None, *, random_backbone: bool = False,
                load_frequency_weights: bool = True, device: str | torch.device = "cpu") -> FreqMedCLIP:
    """Build a model from its config; the only place the streams meet the hubs.

    Args:
        backbone: an already loaded CLIP backbone to share (ensembles); otherwise ``config.backbone`` is loaded.
        random_backbone: build the preset's architecture with random CLIP weights instead of loading it
            (tests, speed benchmarks). Recorded as ``random:<preset>`` in the model and its checkpoints.
        load_frequency_weights: look for ImageNet ConvNeXt weights (False when a checkpoint will overwrite them).
    """
    if backbone is None:
        backbone = random_clip_backbone(config.preset) if random_backbone else load_clip_backbone(config.backbone)
    frequency_backbone, frequency_init = None, "none"
    if config.uses_frequency:
        weights = config.frequency_weights if load_frequency_weights else "none"
        frequency_backbone, frequency_init = create_frequency_backbone(config.frequency_backbone, 12, weights,
                                                                     config.frequency_depths, config.frequency_dims)
    model = FreqMedCLIP(config, backbone, frequency_backbone)
    model.frequency_init = frequency_init
    return model.to(device)


def parameter_report(model: FreqMedCLIP) -> list[dict[str, int | str]]:
    """Total, trainable and frozen parameter counts per paper stage (a last row sums them)."""
    groups = {
        "text encoder (frozen CLIP)": ["text"],
        "ViT (frozen CLIP)": ["semantic.trunk"],
        "TCA adapters": ["semantic.adapters"],
        "FPN adapter": ["semantic.fpn"],
        "frequency encoder": ["frequency"],
        "FFBI / bottleneck": ["fusion"],
        "semantic decoder": ["semantic_decoder"],
        "frequency decoder": ["frequency_decoder"],
        "fusion head": ["head"],
    }
    rows = []
    for name, prefixes in groups.items():
        params = [p for n, p in model.named_parameters() if any(n.startswith(x + ".") for x in prefixes)]
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        if total:
            rows.append({"module": name, "total": total, "trainable": trainable, "frozen": total - trainable})
    rows.append({key: (sum(r[key] for r in rows) if key != "module" else "all") for key in rows[0]})
    return rows
