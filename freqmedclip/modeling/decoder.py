"""Dual decoders with LFFI (Section 3.7) and the output heads (Section 3.8).

Each decoder runs three stages at 28, 56 and 112 (Eq. 15-17). A stage merges the current map with a skip
connection and applies FiLM on the prompt (LFFI, Eq. 14); the decoder upsamples by 2 after each, so the last
stage ends at the input resolution, where a 1x1 head gives one logit per pixel (applied just before that last
upsampling, which gives the same logits for less work).

Notable choices:
* FiLM is ``x * (1 + gamma) + beta`` with a zero-initialised last layer: an untrained FiLM is the identity.
* GroupNorm rather than BatchNorm: the paper's batch is 4 per GPU, where batch statistics are noise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from freqmedclip.modeling.semantic import conv_norm_act, upsample


class FiLM(nn.Module):
    """Eq. 14: [gamma, beta] = MLP(t-bar); FiLM(X) = gamma * X + beta on (B, C, H, W)."""

    def __init__(self, text_dim: int, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor, condition: Tensor | None) -> Tensor:
        if condition is None:  # LFFI switched off at inference
            return x
        gamma, beta = self.mlp(condition).to(x.dtype)[:, :, None, None].chunk(2, dim=1)   # (B, C, 1, 1) each
        return x * (1 + gamma) + beta


class DecoderStage(nn.Module):
    """Eq. 15 up to its upsampling: Y = ConvBlock(concat(X, S)); Y' = FiLM(Y, t-bar) (the decoder applies Up2)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, text_dim: int | None,
                 film_hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(conv_norm_act(in_channels + skip_channels, out_channels),
                                   conv_norm_act(out_channels, out_channels))
        self.film = FiLM(text_dim, out_channels, film_hidden) if text_dim else None

    def forward(self, x: Tensor, skip: Tensor, condition: Tensor | None) -> Tensor:
        y = self.block(torch.cat([x, skip], dim=1))
        if self.film is not None:
            y = self.film(y, condition)
        return y


class Decoder(nn.Module):
    """Dec_s or Dec_f (Eq. 16-17): D^0 (B, d, 28, 28) and skips at 28, 56, 112 -> logits (B, 1, 224, 224).

    Args:
        in_channels: channels of D^0.
        skip_channels: channels of the skips at 28, 56 and 112.
        channels: output channels of the three stages.
        text_dim: width of the conditioning vector, or None for no FiLM (the "w/o LFFI" ablation).
    """

    def __init__(self, in_channels: int, skip_channels: tuple[int, int, int], channels: tuple[int, int, int],
                 text_dim: int | None, film_hidden: int) -> None:
        super().__init__()
        widths = (in_channels, *channels)
        self.stages = nn.ModuleList(
            DecoderStage(widths[i], skip_channels[i], widths[i + 1], text_dim, film_hidden) for i in range(3))
        self.head = nn.Conv2d(channels[-1], 1, 1)                                          # Head_s / Head_f

    def forward(self, x: Tensor, skips: tuple[Tensor, Tensor, Tensor], condition: Tensor | None) -> Tensor:
        *inner, last = self.stages
        for stage, skip in zip(inner, skips):
            x = upsample(stage(x, skip, condition))                                         # 28 -> 56 -> 112
        # Eq. 15's last Up2 and the 1x1 head are both linear and bilinear weights sum to 1, so they commute:
        # the head runs first, at 112, and one channel is upsampled instead of C (same logits, less work).
        return upsample(self.head(last(x, skips[-1], condition)))                          # (B, 1, 224, 224)


class FusionHead(nn.Module):
    """Eq. 18: a two-layer conv block on concat(L_s, L_f) (B, 2, H, W) -> fused logits L (B, 1, H, W).

    Initialised to the branch average, (L_s + L_f) / 2, so training starts from a sensible ensemble.
    """

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.mix = nn.Conv2d(2, hidden, 3, padding=1)
        self.act = nn.GELU()
        self.out = nn.Conv2d(hidden, 1, 1)
        self.skip = nn.Conv2d(2, 1, 1)
        nn.init.constant_(self.skip.weight, 0.5)
        nn.init.zeros_(self.skip.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, branch_logits: Tensor) -> Tensor:
        return self.skip(branch_logits) + self.out(self.act(self.mix(branch_logits)))
