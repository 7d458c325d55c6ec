"""Predictor: any image size and pixel type, per-modality normalisation, bf16 parity, ensembles, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _demo_support import decisive_model
from _tolerances import BF16_LOGIT_REL, probability_margin
from PIL import Image

from freqmedclip.inference.predictor import Predictor
from freqmedclip.inference.preprocess import InputError, normalize
from freqmedclip.modeling.text import PromptError


@pytest.fixture(scope="module")
def predictor(mini_backbone):
    return Predictor(decisive_model(mini_backbone))


@pytest.mark.parametrize("image", [
    np.random.default_rng(0).integers(0, 256, (300, 410), dtype=np.uint8),
    np.random.default_rng(1).integers(0, 65536, (257, 96), dtype=np.uint16),
    np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8),
    np.random.default_rng(3).integers(0, 256, (120, 90, 4), dtype=np.uint8),
    np.random.default_rng(4).normal(size=(100, 130)).astype(np.float32),
], ids=["gray8", "gray16", "rgb", "rgba", "float"])
def test_any_size_and_type_returns_maps_at_original_size(predictor, image):
    prediction = predictor.predict(image, "brain tumour")
    assert prediction.probability.shape == image.shape[:2] and prediction.probability.dtype == np.float32
    assert 0.0 <= prediction.probability.min() and prediction.probability.max() <= 1.0
    assert np.array_equal(prediction.mask, prediction.probability >= 0.5)
    assert prediction.semantic_probability.shape == image.shape[:2]
    assert prediction.frequency_probability.shape == image.shape[:2]
    assert prediction.uncertainty is None  # one model: no spread


def test_original_size_maps_are_the_bilinear_upsampling_of_the_224_prediction(predictor):
    image = np.random.default_rng(5).integers(0, 256, (448, 336, 3), dtype=np.uint8)
    prediction = predictor.predict(image, "lung nodule")
    tensor, size = predictor.prepare(image)
    low = predictor.predict_tensor(tensor, ["lung nodule"])["probability"]
    expected = F.interpolate(low, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(prediction.probability, expected, atol=1e-6)


def test_pil_and_numpy_inputs_agree(predictor):
    array = np.random.default_rng(6).integers(0, 256, (200, 240, 3), dtype=np.uint8)
    from_numpy = predictor.predict(array, "breast mass")
    from_pil = predictor.predict(Image.fromarray(array), "breast mass")
    np.testing.assert_array_equal(from_numpy.probability, from_pil.probability)


def test_several_prompts_match_single_calls(predictor):
    image = np.random.default_rng(7).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    batch = predictor.predict(image, ["whole tumour", "lung nodule"])
    single = predictor.predict(image, "lung nodule")
    assert [p.prompt for p in batch] == ["whole tumour", "lung nodule"]
    # batched and single-row fp32 kernels round differently: |dz| <= FP32_LOGIT_REL (3.1e-5) * max|z| (<= ~55 for
    # decisive models) and sigmoid's slope <= 1/4, so |dp| <= 4.3e-4 on every CPU (the other prompt differs by ~1)
    np.testing.assert_allclose(batch[1].probability, single.probability, atol=4.3e-4)


def test_bf16_masks_match_fp32(mini_backbone):
    """Away from the decision boundary the bf16 mask is the fp32 mask, pixel for pixel; pixels whose fp32 logit
    is within the bf16 round-off bound of 0 (BF16_LOGIT_REL·max|z|, about 8% of them) may go either way, on
    every CPU differently (native AVX512-BF16/AMX or emulated bf16 kernels)."""
    model = decisive_model(mini_backbone, seed=1)
    fp32, bf16 = Predictor(model, dtype="fp32"), Predictor(model, dtype="bf16")
    assert (fp32.dtype, bf16.dtype) == ("fp32", "bf16")
    rng = np.random.default_rng(8)
    for prompt in ("whole tumour", "breast mass", "lung nodule"):
        image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)   # 224: the maps are the model's own
        reference, fast = fp32.predict(image, prompt), bf16.predict(image, prompt)
        assert 0.05 < reference.mask.mean() < 0.95  # a decisive, non-trivial mask, so the comparison is informative
        with torch.no_grad():
            logits = model(fp32.prepare(image)[0], [prompt]).logits[0, 0].numpy()   # fp32, no autocast
        margin = probability_margin(logits, BF16_LOGIT_REL)
        away = np.abs(reference.probability - 0.5) > margin
        assert away.mean() > 0.85 and reference.mask[away].mean() > 0.05
        np.testing.assert_array_equal(fast.mask[away], reference.mask[away])
        difference = np.abs(fast.probability - reference.probability)
        assert difference.max() <= BF16_LOGIT_REL * np.abs(logits).max() / 4   # sigmoid's slope <= 1/4
        assert difference.max() > 1e-3                               # bf16 really ran: fp32 kernels differ < 1e-4


def test_ensemble_averages_members_and_reports_spread(mini_backbone):
    members = [decisive_model(mini_backbone, seed) for seed in (2, 3)]
    image = np.random.default_rng(9).integers(0, 256, (150, 150), dtype=np.uint8)
    singles = [Predictor(m).predict(image, "nodule").probability for m in members]
    both = Predictor(members).predict(image, "nodule")
    np.testing.assert_allclose(both.probability, (singles[0] + singles[1]) / 2, atol=1e-5)
    assert both.uncertainty is not None and both.uncertainty.max() > 0


def test_modality_normalisation_golden_values():
    mri = np.zeros((40, 40), np.float32)
    mri[10:30, 10:30] = np.tile([100.0, 300.0], (20, 10))  # foreground mean 200, std 100
    unit = normalize(mri[..., None], "MRI")[..., 0]
    assert unit[0, 0] == 0.0  # background stays black
    assert unit[10, 10] == pytest.approx((-1 + 3) / 6) and unit[10, 11] == pytest.approx((1 + 3) / 6)
    hu = np.array([[-1350.0, -600.0], [150.0, 400.0]], np.float32)[..., None]
    np.testing.assert_allclose(normalize(hu, "CT", "lung")[..., 0], [[0.0, 0.5], [1.0, 1.0]])
    np.testing.assert_allclose(normalize(hu, "CT", (40.0, 400.0))[..., 0], [[0, 0], [0.775, 1.0]])  # (150 + 160) / 400
    gray16 = np.array([[1000, 3000]], np.uint16)[..., None]
    np.testing.assert_allclose(normalize(gray16, "MG")[..., 0], [[0.0, 1.0]])


@pytest.mark.parametrize("image, message", [
    (np.zeros((64, 64, 2), np.uint8), "shape"),
    (np.zeros((4, 64, 64, 3), np.uint8), "shape"),
    (np.zeros((64, 64), bool), "pixel type"),
    (np.full((64, 64), np.nan, np.float32), "NaN"),
    (np.zeros((20, 300), np.uint8), "at least 32"),
    ("not an image", "numpy array"),
])
def test_bad_images_get_clear_errors(predictor, image, message):
    with pytest.raises(InputError, match=message):
        predictor.predict(image, "tumour")


def test_size_limit_and_prompts(mini_backbone):
    small_limit = Predictor(decisive_model(mini_backbone), max_pixels=100 * 100)
    with pytest.raises(InputError, match="over the limit"):
        small_limit.predict(np.zeros((101, 100), np.uint8), "tumour")
    image = np.zeros((64, 64), np.uint8)
    with pytest.raises(PromptError, match="empty"):
        small_limit.predict(image, "   ")
    with pytest.raises(InputError, match="modality"):
        small_limit.predict(image, "tumour", modality="PET")
    with pytest.warns(UserWarning, match="truncated"):
        small_limit.predict(image, " ".join(["tumour"] * 200))
