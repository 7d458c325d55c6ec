"""Semantic stream (Section 3.4): frozen BiomedCLIP ViT, text-conditioned adapters, FPN adapter.

Notable choices:
* The adapters are inline (Eq. 5-6): their output feeds the next frozen ViT block, so text conditions the
  deeper layers, not only a side branch. Their output projections are zero-initialised, so an untrained
  adapter is the identity and the frozen ViT starts exactly as pretrained.
* Adapters attend through a bottleneck of width ``tca_width`` (queries, keys and values projected to it),
  which keeps them small next to the FPN and decoders; the paper leaves this width open.
* Blocks before the first adapter see no trainable input, so they run without autograd (saves memory),
  unless the image itself requires a gradient (input-gradient explanations).
* The FPN's lateral projections psi normalise the ViT tokens (LayerNorm) before the 1x1 conv: the residual
  stream of a ViT grows with depth, and the four taps must be on one scale before they are summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freqmedclip.modeling.text import TextFeatures


def upsample(x: Tensor, factor: int = 2) -> Tensor:
    """Up_k of the paper: bilinear resize by an integer factor."""
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.GELU(),
    )


class TextConditionedAdapter(nn.Module):
    """TCA (Eq. 5-6): image tokens query the prompt's tokens, then a small residual FFN.

    x (B, N, D) attends to T (B, L, d_t) with padding masked; returns (B, N, D).
    """

    def __init__(self, dim: int, text_dim: int, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, width)
        self.key = nn.Linear(text_dim, width)
        self.value = nn.Linear(text_dim, width)
        self.out = nn.Linear(width, dim)
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU(), nn.Linear(width, dim))
        for last in (self.out, self.ffn[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, text: TextFeatures) -> Tensor:
        batch, tokens, _ = x.shape
        q = self.query(self.norm(x)).unflatten(-1, (self.heads, -1)).transpose(1, 2)       # (B, h, N, w/h)
        k = self.key(text.tokens).unflatten(-1, (self.heads, -1)).transpose(1, 2)          # (B, h, L, w/h)
        v = self.value(text.tokens).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        mask = ~text.padding[:, None, None, :]                                             # (B, 1, 1, L)
        attended = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, tokens, -1))              # Eq. 5
        return x + self.ffn(x)                                                              # Eq. 6


class FiLMTokenAdapter(nn.Module):
    """TCA, cheap variant: FiLM on tokens, x * (1 + gamma) + beta with [gamma, beta] = MLP(t-bar)."""

    def __init__(self, dim: int, text_dim: int, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(text_dim, width), nn.GELU(), nn.Linear(width, 2 * dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor, text: TextFeatures) -> Tensor:
        gamma, beta = self.mlp(text.pooled).to(x.dtype)[:, None].chunk(2, dim=-1)          # (B, 1, D) each
        return x * (1 + gamma) + beta


class FPNAdapter(nn.Module):
    """Eq. 7: ViT taps U(3), U(6), U(9), U(12) (B, D, 14, 14) -> S1..S4 at 14, 28, 56, 112."""

    def __init__(self, dim: int, channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))                   # shallow to deep
        self.phi12 = conv_norm_act(dim, c1)
        self.psi9, self.phi9 = nn.Conv2d(dim, c1, 1), conv_norm_act(c1, c2)
        self.psi6, self.phi6 = nn.Conv2d(dim, c2, 1), conv_norm_act(c2, c3)
        self.psi3, self.phi3 = nn.Conv2d(dim, c3, 1), conv_norm_act(c3, c4)

    def forward(self, taps: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        u3, u6, u9, u12 = (norm(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for norm, t in zip(self.norms, taps))
        s1 = self.phi12(u12)                                                    # (B, C1, 14, 14)
        s2 = self.phi9(upsample(s1) + upsample(self.psi9(u9), 2))               # (B, C2, 28, 28)
        s3 = self.phi6(upsample(s2) + upsample(self.psi6(u6), 4))               # (B, C3, 56, 56)
        s4 = self.phi3(upsample(s3) + upsample(self.psi3(u3), 8))               # (B, C4, 112, 112)
        return s1, s2, s3, s4


class SemanticEncoder(nn.Module):
    """SemEnc + FPN (Eq. 4-7): normalised image (B, 3, 224, 224) and prompt -> S1..S4.

    Args:
        trunk: the frozen timm ViT of the CLIP backbone (``visual.trunk``).
        text_dim: d_t of the text tokens.
        layers: 1-based blocks after which adapters sit and features are tapped (3, 6, 9, 12).
        tca: "cross_attention", "film" or "none".
    """

    def __init__(self, trunk: nn.Module, text_dim: int, layers: tuple[int, ...], tca: str, tca_width: int,
                 tca_heads: int, fpn_channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.trunk = trunk
        self.layers = tuple(layers)
        dim = trunk.embed_dim
        if tca == "cross_attention":
            adapters = [TextConditionedAdapter(dim, text_dim, tca_width, tca_heads) for _ in layers]
        elif tca == "film":
            adapters = [FiLMTokenAdapter(dim, text_dim, tca_width) for _ in layers]
        else:
            adapters = []
        self.adapters = nn.ModuleList(adapters)
        self.fpn = FPNAdapter(dim, fpn_channels)
        self.grid = tuple(trunk.patch_embed.grid_size)

    def train(self, mode: bool = True) -> SemanticEncoder:
        super().train(mode)
        self.trunk.eval()  # frozen: no dropout, no drop-path
        return self

    def forward(self, image: Tensor, text: TextFeatures) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """image: (B, 3, 224, 224) normalised, or (1, 3, 224, 224) shared by the B prompts of ``text``."""
        trunk = self.trunk
        batch = len(text.pooled)
        # Blocks up to the first adapter read neither the prompt nor a trainable weight: a shared image goes through
        # them once, without a graph unless the image itself needs gradients.
        shared_depth = self.layers[0] if self.adapters else len(trunk.blocks)
        taps = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and image.requires_grad):
            x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(image))))  # (B or 1, 1+N, D)
            for depth in range(1, shared_depth + 1):
                x = trunk.blocks[depth - 1](x)
                if depth in self.layers and not self.adapters:  # with adapters a tap is taken after its adapter
                    taps.append(x)
        x, taps = x.expand(batch, -1, -1), [t.expand(batch, -1, -1) for t in taps]          # (B, 1+N, D)
        for depth in range(shared_depth, len(trunk.blocks) + 1) if self.adapters else ():
            if depth > shared_depth:
                x = trunk.blocks[depth - 1](x)
            if depth in self.layers:
                x = self.adapters[self.layers.index(depth)](x, text)                           # TCA, inline
                taps.append(x)
        prefix = trunk.num_prefix_tokens
        grids = [t[:, prefix:].transpose(1, 2).unflatten(-1, self.grid) for t in taps]         # 4 x (B, D, 14, 14)
        return self.fpn(grids)
