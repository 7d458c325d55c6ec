"""Loss golden values (Eq. 19-20), computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from freqmedclip.modeling.losses import dice_loss, segmentation_loss
from freqmedclip.modeling.model import SegOutput

TARGET = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # (1, 1, 2, 2), one foreground pixel


def test_dice_loss_at_half_probability():
    # p = 0.5 everywhere: overlap 0.5, sum p = 2, sum y = 1 -> Dice = (2*0.5 + 1) / (2 + 1 + 1) = 0.5
    assert dice_loss(torch.zeros(1, 1, 2, 2), TARGET).item() == pytest.approx(0.5, abs=1e-7)


def test_dice_loss_on_empty_target_pushes_towards_empty():
    # empty target, p = 0.5: Dice = (0 + 1) / (2 + 0 + 1) = 1/3 -> loss 2/3; near-empty prediction -> ~0
    assert dice_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == pytest.approx(2 / 3, abs=1e-7)
    assert dice_loss(torch.full((1, 1, 2, 2), -30.0), torch.zeros(1, 1, 2, 2)).item() < 1e-9


def test_dice_loss_perfect_and_inverted():
    perfect = (TARGET * 2 - 1) * 30
    assert dice_loss(perfect, TARGET).item() == pytest.approx(0.0, abs=1e-6)
    # inverted: p = 1 on the 3 background pixels: overlap 0 -> Dice = 1 / (3 + 1 + 1) = 0.2 -> loss 0.8
    assert dice_loss(-perfect, TARGET).item() == pytest.approx(0.8, abs=1e-6)


def test_dice_loss_is_averaged_per_sample():
    logits = torch.cat([torch.zeros(1, 1, 2, 2), (TARGET * 2 - 1) * 30])
    target = torch.cat([TARGET, TARGET])
    assert dice_loss(logits, target).item() == pytest.approx((0.5 + 0.0) / 2, abs=1e-6)


def test_segmentation_loss_with_deep_supervision():
    zeros = torch.zeros(1, 1, 2, 2)
    terms = segmentation_loss(SegOutput(zeros, zeros, zeros), TARGET, bce_weight=1.0, semantic_weight=0.4,
                              frequency_weight=0.4)
    # Dice 0.5, BCE ln 2, each branch Dice 0.5: 0.5 + ln2 + 0.4 * 0.5 + 0.4 * 0.5
    assert terms.bce.item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms.total.item() == pytest.approx(0.5 + math.log(2) + 0.4, abs=1e-6)
    heavier = segmentation_loss(SegOutput(zeros, zeros, zeros), TARGET, bce_weight=2.0, semantic_weight=0.0,
                                frequency_weight=1.0)
    assert heavier.total.item() == pytest.approx(0.5 + 2 * math.log(2) + 0.5, abs=1e-6)


def test_single_branch_outputs_have_no_auxiliary_terms():
    zeros = torch.zeros(1, 1, 2, 2)
    terms = segmentation_loss(SegOutput(zeros, zeros, None), TARGET)
    assert terms.semantic_dice.item() == 0.0 and terms.frequency_dice.item() == 0.0
    assert terms.total.item() == pytest.approx(0.5 + math.log(2), abs=1e-6)


def test_branch_bce_adds_lambda_bce_to_each_branch():
    zeros = torch.zeros(1, 1, 2, 2)
    plain = segmentation_loss(SegOutput(zeros, zeros, zeros), TARGET, bce_weight=2.0)
    with_bce = segmentation_loss(SegOutput(zeros, zeros, zeros), TARGET, bce_weight=2.0, branch_bce=True)
    # p = 0.5: each branch term gains lambda * ln 2; the total gains (alpha + beta) * lambda * ln 2
    assert with_bce.semantic_dice.item() == pytest.approx(0.5 + 2.0 * math.log(2), abs=1e-6)
    assert with_bce.frequency_dice.item() == pytest.approx(0.5 + 2.0 * math.log(2), abs=1e-6)
    assert (with_bce.total - plain.total).item() == pytest.approx(0.8 * 2.0 * math.log(2), abs=1e-6)


def test_a_silent_branch_gets_a_gradient_only_with_branch_bce():
    # L_s = -20 everywhere: sigma' = p(1 - p) ~ 2e-9, so soft Dice barely moves it; BCE's gradient is (p - y) / N
    fused, frequency = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    grads = []
    for branch_bce in (False, True):
        semantic = torch.full((1, 1, 2, 2), -20.0, requires_grad=True)
        segmentation_loss(SegOutput(fused, semantic, frequency), TARGET, branch_bce=branch_bce).total.backward()
        grads.append(semantic.grad[0, 0, 0, 0].item())
    assert abs(grads[0]) < 1e-8
    assert grads[1] == pytest.approx(0.4 * (torch.sigmoid(torch.tensor(-20.0)).item() - 1) / 4, rel=1e-4)


def test_bce_pos_weight_scales_the_target_pixels_of_every_bce():
    # logits 0 (p = 0.5), one target pixel of four, pos_weight 10: BCE = (10 ln 2 + 3 ln 2) / 4 = 13/4 ln 2
    zeros = torch.zeros(1, 1, 2, 2)
    terms = segmentation_loss(SegOutput(zeros, zeros, zeros), TARGET, bce_weight=1.0, branch_bce=True,
                              bce_pos_weight=10.0)
    assert terms.bce.item() == pytest.approx(13 / 4 * math.log(2), abs=1e-6)
    assert terms.semantic_dice.item() == pytest.approx(0.5 + 13 / 4 * math.log(2), abs=1e-6)
    # on a silent map the target pixel's gradient is pos_weight times larger: 10 (p - 1) / 4 at p = sigmoid(-20)
    logits = torch.full((1, 1, 2, 2), -20.0, requires_grad=True)
    segmentation_loss(SegOutput(logits, None, None), TARGET, bce_pos_weight=10.0).total.backward()
    silent = torch.sigmoid(torch.tensor(-20.0)).item()   # sigma'(-20) ~ 2e-9: soft Dice adds nothing at this rel
    assert logits.grad[0, 0, 0, 0].item() == pytest.approx(10 * (silent - 1) / 4, rel=1e-4)
    assert abs(logits.grad[0, 0, 1, 1].item()) < 1e-8   # background: p / 4 ~ 5e-10
