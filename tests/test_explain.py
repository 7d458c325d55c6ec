"""Explanations and inference-time switches: sub-bands, per-stream Grad-CAM, FFBI attention, ablation toggles."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
from _demo_support import decisive_model
from _tolerances import BF16_LOGIT_REL, FP32_LOGIT_REL, decided

from freqmedclip.inference.explain import ffbi_attention, stream_gradcam, wavelet_bands
from freqmedclip.modeling.model import FreqMedCLIP, Switches
from freqmedclip.inference.predictor import Predictor


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
    ("unet_clip", False, False),   # its pixel-domain UNet is not a frequency stream
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


def _textbook_gradcam(model: FreqMedCLIP, image: torch.Tensor, prompt: str,
                      region: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Grad-CAM the usual way, without reusing any batch's features: one single-prompt forward with gradients in
    fp32 in which a hook hands FFBI fresh leaf copies of S1 and F3, then d(sum of fused logits in ``region``)
    / d(S1, F3): the bottleneck path only (S1 also seeds the FPN's S2-S4, F3 nothing else). Returns the two maps
    and this forward's fp32 logits (224, 224).

    ``region`` is the predicted region of the batched forward under test (its probability >= 1/2, i.e. logit
    >= 0). Taking it from there, not from this forward's own logits, keeps the comparison continuous: a pixel
    whose logit lies within round-off of 0 may fall on either side in the two forwards (different kernels), and
    one such pixel moves the whole normalised map by ~1/|region| (8.5e-4 seen here, 3.5e-4 on an AMD EPYC with
    AVX512-BF16). That the region is this forward's own away from the boundary is checked by the caller."""
    leaves = {}

    def substitute(module, args):
        leaves.update(s1=args[0].detach().requires_grad_(True), f3=args[1].detach().requires_grad_(True))
        return (leaves["s1"], leaves["f3"], *args[2:])

    handle = model.fusion.register_forward_pre_hook(substitute)
    with torch.enable_grad():
        logits = model(image, [prompt]).logits
    handle.remove()
    target = (logits * torch.from_numpy(region)).sum()
    maps = []
    for activation, gradient in zip(leaves.values(), torch.autograd.grad(target, list(leaves.values()))):
        cam = torch.relu((gradient.mean((2, 3), keepdim=True) * activation).sum(1, keepdim=True))
        cam = torch.nn.functional.interpolate(cam, size=(224, 224), mode="bilinear", align_corners=False)[0, 0]
        maps.append(((cam - cam.min()) / (cam.max() - cam.min())).detach().numpy())
    return maps, logits[0, 0].detach().numpy()


# Tolerances on the [0, 1] maps. fp32: the two forwards' features differ by round-off only, <= FP32_LOGIT_REL
# (3e-5) relative; Grad-CAM's channel sum and min-max normalisation amplify that a few times (cancellation), so
# 1e-4 (observed 1.6e-6) holds with margin on every kernel. bf16: the batch's features carry bf16 round-off,
# <= BF16_LOGIT_REL (0.031) relative, so 0.05 (observed 0.016); the fp32 decoding itself is checked by dtype.
@pytest.mark.parametrize("dtype, tolerance, boundary",
                         [("fp32", 1e-4, FP32_LOGIT_REL), ("bf16", 0.05, BF16_LOGIT_REL)])
def test_gradcam_from_the_batched_forward_equals_a_separate_gradcam(mini_backbone, dtype, tolerance, boundary):
    """bf16: the batch runs in bf16, the Grad-CAM decoding in fp32, so only the bf16 features differ."""
    models = [decisive_model(mini_backbone, seed) for seed in (0, 1)]
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(123))  # one with a pixel near z=0
    prompts = ["lesion", "whole tumour", "tumour core", "a purple elephant"]
    predictor = Predictor(models, dtype=dtype)
    head_dtypes = []
    hooks = [model.head.register_forward_hook(lambda module, args, out: head_dtypes.append((len(out), out.dtype)))
             for model in models]
    maps = predictor.predict_tensor(image, prompts, explain="tumour core")
    for hook in hooks:
        hook.remove()
    # per member: the batched decoding in the predictor's dtype, then the explained row's decoding in fp32
    batch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert head_dtypes == [(4, batch_dtype), (1, torch.float32)] * 2
    regions = (maps["members"][:, prompts.index("tumour core"), 0] >= 0.5).numpy()
    references = []
    for model, region in zip(models, regions):
        reference, logits = _textbook_gradcam(model, image, "tumour core", region)
        away = decided(logits, boundary)   # the batch's region is the textbook's own there (logit > 0)
        assert away.mean() > 0.8 and np.array_equal(region[away], (logits > 0)[away])
        references.append(reference)
    for stream, ours in enumerate(maps["gradcam"]):
        expected = np.mean([reference[stream] for reference in references], axis=0)
        assert ours.shape == (224, 224) and ours.dtype == np.float32 and expected.std() > 0.05
        np.testing.assert_allclose(ours, expected, atol=tolerance)
    # the explained prompt's maps differ from another prompt's, so the row was really picked
    other = predictor.predict_tensor(image, prompts, explain="lesion")["gradcam"]
    assert np.abs(other.semantic - maps["gradcam"].semantic).max() > 0.05
    assert all(p.grad is None for model in models for p in model.parameters())
    with pytest.raises(ValueError, match="'mass', is not one of the prompts"):
        predictor.predict_tensor(image, prompts, explain="mass")


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
