"""Our fast Grad-CAM against an independent implementation: pytorch-grad-cam (PyPI grad-cam) on the same target
layers (S1, F3 as modules of ``explain.DecodeFromBottleneck``) and the same target (the sum of the fused logits in
the predicted mask, ``SemanticSegmentationTarget``), plus the other CAM methods the demo offers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _demo_support import decisive_model

pytest.importorskip("pytorch_grad_cam")   # grad-cam (requirements.txt) is the reference CAM library; absent, skip
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget  # noqa: E402

from freqmedclip.inference.explain import (  # noqa: E402
    LIBRARY_CAM_METHODS,
    DecodeFromBottleneck,
    library_cams,
    stream_gradcam,
)
from freqmedclip.inference.predictor import Predictor  # noqa: E402

PROMPT = "tumour core"


def _library_gradcam(model, image: torch.Tensor, region: np.ndarray) -> list[np.ndarray]:
    wrapped = DecodeFromBottleneck(model, PROMPT)
    maps = []
    for tap in (wrapped.semantic_tap, wrapped.frequency_tap):
        with GradCAM(model=wrapped, target_layers=[tap]) as cam:
            maps.append(cam(input_tensor=image, targets=[SemanticSegmentationTarget(0, region)])[0])
    model.zero_grad(set_to_none=True)
    return maps


def test_fast_gradcam_equals_pytorch_grad_cam(mini_backbone):
    """The library min-max normalises the 14x14 map, resizes it with cv2 (bilinear, half-pixel centres) and
    min-max normalises again; we resize with torch (bilinear, align_corners=False: the same weights) and normalise
    once. Min-max is affine and bilinear weights sum to 1, so both orders give the same map; what remains is
    float32 round-off of two backward passes that sum the same gradients in different orders and of two resize
    kernels (observed below 1e-6), so 1e-5 on the [0, 1] maps."""
    model = decisive_model(mini_backbone, seed=4)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        region = (model(image, [PROMPT]).logits[0, 0] > 0).float().numpy()
    assert 0.01 < region.mean() < 0.99                                   # a real, non-trivial target
    reference = _library_gradcam(model, image, region)
    ours = stream_gradcam(model, image, PROMPT)
    for mine, theirs in zip(ours, reference, strict=True):
        assert theirs.std() > 0.05
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
    # through the Predictor (the demo's path: features of a batched forward), the same map
    batched = Predictor([model]).predict_tensor(image, ["lesion", PROMPT], explain=PROMPT)["gradcam"]
    for mine, theirs in zip(batched, reference, strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-4)             # batched vs single-row kernels, as in
    assert all(p.grad is None for p in model.parameters())              # test_explain's batched comparison


@pytest.mark.parametrize("method", LIBRARY_CAM_METHODS)
def test_every_offered_cam_method_gives_both_streams(mini_backbone, method):
    model = decisive_model(mini_backbone, seed=4)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    cams = library_cams(model, image, PROMPT, method)
    for cam in cams:
        assert cam.shape == (224, 224) and cam.dtype == np.float32 and 0.0 <= cam.min() and cam.max() <= 1.0 + 1e-6
    assert not cams.empty and all(p.grad is None for p in model.parameters())
    empty = library_cams(decisive_model(mini_backbone, empty=True), image, PROMPT, method)
    assert empty.empty


def test_library_gradcam_method_is_the_reference(mini_backbone):
    """The dropdown's "Grad-CAM (pytorch-grad-cam)" is the library's map: equal to ours (see above)."""
    model = decisive_model(mini_backbone, seed=4)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    theirs = library_cams(model, image, PROMPT, LIBRARY_CAM_METHODS[0])
    ours = stream_gradcam(model, image, PROMPT)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
