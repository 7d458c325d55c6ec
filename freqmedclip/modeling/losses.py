"""Training objective (Section 3.9): Dice + lambda * BCE on the fused mask, Dice on each branch (Eq. 19-20).

Notable choices:
* Soft Dice is computed per sample with smoothing 1 (in pixels): an empty target then still has a gradient
  that pushes the prediction to empty, which is what negative prompts need.
* Losses are computed in float32 even under autocast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from freqmedclip.modeling.model import SegOutput


class LossTerms(NamedTuple):
    total: Tensor
    dice: Tensor
    bce: Tensor
    semantic_dice: Tensor
    frequency_dice: Tensor


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - soft Dice per sample, averaged over the batch. logits, target: (B, 1, H, W)."""
    probs = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    overlap = (probs * target).sum(1)
    return (1 - (2 * overlap + smooth) / (probs.sum(1) + target.sum(1) + smooth)).mean()


def segmentation_loss(output: SegOutput, target: Tensor, bce_weight: float = 1.0, semantic_weight: float = 0.4,
                      frequency_weight: float = 0.4) -> LossTerms:
    """Eq. 20: L = Dice(M, Y) + lambda BCE(M, Y) + alpha Dice(sigma(L_s), Y) + beta Dice(sigma(L_f), Y).

    Branch terms are zero for variants without two branches. target: (B, 1, H, W) in {0, 1}.
    """
    dice = dice_loss(output.logits, target)
    bce = F.binary_cross_entropy_with_logits(output.logits.float(), target.float())
    zero = dice.new_zeros(())
    two_branches = output.semantic_logits is not None and output.frequency_logits is not None
    semantic = dice_loss(output.semantic_logits, target) if two_branches else zero
    frequency = dice_loss(output.frequency_logits, target) if two_branches else zero
    total = dice + bce_weight * bce + semantic_weight * semantic + frequency_weight * frequency
    return LossTerms(total, dice, bce, semantic, frequency)
