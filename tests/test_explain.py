"""Explanations and inference-time switches: sub-bands, per-stream Grad-CAM, FFBI attention, ablation toggles."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
from _demo_support import decisive_model

from freqmedclip.explain import ffbi_attention, stream_gradcam, wavelet_bands
from freqmedclip.model import Switches


def test_wavelet_bands_are_what_the_encoder_sees():
    image = torch.rand(1, 3, 224, 224, dtype=torch.float64)
    bands = wavelet_bands(image)
    cA, (cH, cV, cD) = pywt.dwt2(image[0].numpy(), "haar", axes=(-2, -1))
    np.testing.assert_allclose(bands["LL"], cA.mean(0) / 2, atol=1e-12)  # LL halved: the local mean
    np.testing.assert_allclose(bands["LH"], cH.mean(0), atol=1e-12)
    np.testing.assert_allclose(bands["HL"], cV.mean(0), atol=1e-12)
    np.testing.assert_allclose(bands["HH"], cD.mean(0), atol=1e-12)


@pytest.mark.parametrize("variant, has_semantic, has_frequency", [
    ("full", True, True), ("no_tca", True, True), ("semantic_only", True, False), ("frequency_only", False, True),
])
def test_stream_gradcam_gives_one_normalised_map_per_stream(mini_backbone, variant, has_semantic, has_frequency):
    model = decisive_model(mini_backbone, variant=variant)
    image = torch.rand(1, 3, 224, 224)
    cams = stream_gradcam(model, image, "whole tumour")
    for cam, present in ((cams.semantic, has_semantic), (cams.frequency, has_frequency)):
        if not present:
            assert cam is None
            continue
        assert cam.shape == (224, 224) and cam.min() == pytest.approx(0.0) and cam.max() == pytest.approx(1.0)
    assert all(p.grad is None for p in model.parameters())  # explanation leaves no gradients behind


def test_ffbi_attention_rows_are_distributions(mini_backbone):
    model = decisive_model(mini_backbone)
    maps = ffbi_attention(model, torch.rand(1, 3, 224, 224), "mass", row=3, col=11)
    for attention in maps:
        assert attention.shape == (14, 14) and (attention >= 0).all()
        assert attention.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="outside"):
        ffbi_attention(model, torch.rand(1, 3, 224, 224), "mass", row=14, col=0)
    with pytest.raises(ValueError, match="no FFBI"):
        ffbi_attention(decisive_model(mini_backbone, variant="no_ffbi"), torch.rand(1, 3, 224, 224), "mass", 0, 0)


def test_switches_change_exactly_their_component(mini_backbone):
    model = decisive_model(mini_backbone)
    image = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        full = model(image, ["oedema"])
        no_frequency = model(image, ["oedema"], switches=Switches(frequency=False))
        no_ffbi = model(image, ["oedema"], switches=Switches(ffbi=False))
        no_film = model(image, ["oedema"], switches=Switches(film=False))
    assert torch.equal(no_frequency.logits, no_frequency.semantic_logits)  # the semantic branch alone
    for variant in (no_frequency, no_ffbi, no_film):
        assert not torch.allclose(variant.logits, full.logits, atol=1e-4)
    # Without FFBI the semantic branch no longer depends on the frequency stream's input.
    with torch.no_grad():
        model.frequency.convnext.stem[0].weight.mul_(3.0)
        changed = model(image, ["oedema"], switches=Switches(ffbi=False))
    assert torch.allclose(changed.semantic_logits, no_ffbi.semantic_logits, atol=1e-6)
    assert not torch.allclose(changed.frequency_logits, no_ffbi.frequency_logits, atol=1e-4)
