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
    semantic_dice: Tensor       # the semantic branch term (Dice, + lambda BCE with branch_bce)
    frequency_dice: Tensor      # the frequency branch term


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - soft Dice per sample, averaged over the batch. logits, target: (B, 1, H, W)."""
    probs = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    overlap = (probs * target).sum(1)
    return (1 - (2 * overlap + smooth) / (probs.sum(1) + target.sum(1) + smooth)).mean()


def segmentation_loss(output: SegOutput, target: Tensor, bce_weight: float = 1.0, semantic_weight: float = 0.4,
                      frequency_weight: float = 0.4, branch_bce: bool = False,
                      bce_pos_weight: float = 1.0) -> LossTerms:
    """Eq. 20: L = Dice(M, Y) + lambda BCE(M, Y) + alpha Dice(sigma(L_s), Y) + beta Dice(sigma(L_f), Y).

    ``branch_bce`` adds lambda BCE to each branch term: a branch whose logits are very negative everywhere gets
    almost no gradient from soft Dice (sigma' ~ 0 there) but the full p - y from BCE, so it cannot go silent.
    ``bce_pos_weight`` multiplies the BCE of target pixels (torch's ``pos_weight``): a target of 0.5 % of the image
    (a lung nodule crop) otherwise weighs so little beside its background that the easy answer is "empty".
    Branch terms are zero for variants without two branches. target: (B, 1, H, W) in {0, 1}.
    """
    pos_weight = None if bce_pos_weight == 1.0 else target.new_tensor(bce_pos_weight, dtype=torch.float32)

    def bce_loss(logits: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=pos_weight)

    def branch(logits: Tensor) -> Tensor:
        term = dice_loss(logits, target)
        if branch_bce:
            term = term + bce_weight * bce_loss(logits)
        return term

    dice = dice_loss(output.logits, target)
    bce = bce_loss(output.logits)
    zero = dice.new_zeros(())
    two_branches = output.semantic_logits is not None and output.frequency_logits is not None
    semantic = branch(output.semantic_logits) if two_branches else zero
    frequency = branch(output.frequency_logits) if two_branches else zero
    total = dice + bce_weight * bce + semantic_weight * semantic + frequency_weight * frequency
    return LossTerms(total, dice, bce, semantic, frequency)
