"""Bottleneck fusion (Section 3.6): FFBI, its concatenation ablation, and the single-stream bottleneck.

Every module here maps the 14x14 bottleneck features to the decoders' 28x28 starting maps (Eq. 13).

Notable choices:
* The two cross-attentions of Eq. 11 both read the projected tokens *before* either update, so the exchange
  is symmetric (neither stream sees the other's already-fused tokens). Queries and keys are LayerNorm-ed
  (pre-norm), as in every stable transformer block; the residual uses the un-normalised tokens.
* The optional text gate (Eq. 12) is zero-initialised to the identity: gamma = 1 + MLP_gamma, beta = MLP_beta.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from freqmedclip.modeling.semantic import upsample


class BottleneckOutput(NamedTuple):
    semantic: Tensor | None                 # D_s^0 (B, d, 28, 28)
    frequency: Tensor | None                # D_f^0 (B, d, 28, 28)
    semantic_attention: Tensor | None       # (B, 196, 196): semantic query -> frequency key, if requested
    frequency_attention: Tensor | None      # (B, 196, 196): frequency query -> semantic key, if requested


class TextGate(nn.Module):
    """Eq. 12: [gamma_b, beta_b] = MLP_b(t-bar); z <- gamma_b * z + beta_b on (B, N, d) tokens."""

    def __init__(self, text_dim: int, width: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * width))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, tokens: Tensor, condition: Tensor | None) -> Tensor:
        if condition is None:  # text conditioning switched off at inference
            return tokens
        gamma, beta = self.mlp(condition).to(tokens.dtype)[:, None].chunk(2, dim=-1)    # (B, 1, d)
        return tokens * (1 + gamma) + beta


def flat(x: Tensor) -> Tensor:
    """flat(X) of the paper: (B, C, h, w) -> (B, h*w, C)."""
    return x.flatten(2).transpose(1, 2)


def unflat(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).unflatten(-1, size)


class CrossStreamFusion(nn.Module):
    """FFBI (Eq. 10-13): bidirectional cross-attention between S1 and F3 at the 14x14 bottleneck."""

    def __init__(self, semantic_channels: int, frequency_channels: int, width: int, heads: int,
                 text_dim: int | None) -> None:
        super().__init__()
        self.project_semantic = nn.Linear(semantic_channels, width)                  # W_s
        self.project_frequency = nn.Linear(frequency_channels, width)                # W_f
        self.norm_semantic = nn.LayerNorm(width)
        self.norm_frequency = nn.LayerNorm(width)
        self.semantic_reads_frequency = nn.MultiheadAttention(width, heads, batch_first=True)
        self.frequency_reads_semantic = nn.MultiheadAttention(width, heads, batch_first=True)
        self.gate = TextGate(text_dim, width, width) if text_dim else None

    def forward(self, s1: Tensor, f3: Tensor, condition: Tensor | None, return_attention: bool = False,
                exchange: bool = True) -> BottleneckOutput:
        """exchange=False skips the cross-attention (inference-time "FFBI off"); condition=None skips the gate."""
        size = s1.shape[-2:]
        z_s = self.project_semantic(flat(s1))                                        # (B, 196, d)  Eq. 10
        z_f = self.project_frequency(flat(f3))                                       # (B, 196, d)
        attention_s = attention_f = None
        if exchange:
            n_s, n_f = self.norm_semantic(z_s), self.norm_frequency(z_f)
            read_f, attention_s = self.semantic_reads_frequency(n_s, n_f, n_f, need_weights=return_attention)
            read_s, attention_f = self.frequency_reads_semantic(n_f, n_s, n_s, need_weights=return_attention)
            z_s, z_f = z_s + read_f, z_f + read_s                                    # Eq. 11
        if self.gate is not None:
            z_s, z_f = self.gate(z_s, condition), self.gate(z_f, condition)          # Eq. 12
        d_s = upsample(unflat(z_s, size))                                            # (B, d, 28, 28) Eq. 13
        d_f = upsample(unflat(z_f, size))
        return BottleneckOutput(d_s, d_f, attention_s, attention_f)


class ConcatFusion(nn.Module):
    """The "w/o FFBI" ablation: each stream sees the other by channel concatenation, no attention."""

    def __init__(self, semantic_channels: int, frequency_channels: int, width: int, text_dim: int | None) -> None:
        super().__init__()
        self.project_semantic = nn.Linear(semantic_channels, width)
        self.project_frequency = nn.Linear(frequency_channels, width)
        self.mix_semantic = nn.Linear(2 * width, width)
        self.mix_frequency = nn.Linear(2 * width, width)
        self.gate = TextGate(text_dim, width, width) if text_dim else None

    def forward(self, s1: Tensor, f3: Tensor, condition: Tensor | None, return_attention: bool = False,
                exchange: bool = True) -> BottleneckOutput:
        size = s1.shape[-2:]
        z_s, z_f = self.project_semantic(flat(s1)), self.project_frequency(flat(f3))
        if exchange:
            z_s, z_f = self.mix_semantic(torch.cat([z_s, z_f], -1)), self.mix_frequency(torch.cat([z_f, z_s], -1))
        if self.gate is not None:
            z_s, z_f = self.gate(z_s, condition), self.gate(z_f, condition)
        return BottleneckOutput(upsample(unflat(z_s, size)), upsample(unflat(z_f, size)), None, None)


class SingleStreamBottleneck(nn.Module):
    """Single-stream models: project the 14x14 features to width d and upsample to 28 (Eq. 13 alone)."""

    def __init__(self, channels: int, width: int, text_dim: int | None) -> None:
        super().__init__()
        self.project = nn.Linear(channels, width)
        self.gate = TextGate(text_dim, width, width) if text_dim else None

    def forward(self, features: Tensor, condition: Tensor | None) -> Tensor:
        z = self.project(flat(features))
        if self.gate is not None:
            z = self.gate(z, condition)
        return upsample(unflat(z, features.shape[-2:]))                              # (B, d, 28, 28)
