"""Frequency stream (Section 3.5): Haar DWT, the sub-band input, the ConvNeXt pyramid, stem weight mapping.

References are independent of the code under test: PyWavelets, hand-computed 2x2 values, timm's own
``forward_intermediates`` / ``feature_info``, and a plain strided convolution on the image.
"""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import timm
import torch
import torch.nn.functional as F

from freqmedclip.modeling.backbone import create_frequency_backbone, haar_stem_weights
from freqmedclip.modeling.frequency import (
    BANDS,
    FrequencyEncoder,
    haar_dwt,
    haar_idwt,
    haar_stem_kernel,
    subband_input,
)

# ---------------------------------------------------------------------------------------------------------
# Haar DWT


@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (1, 1, 2, 2), (3, 2, 16, 6)])
def test_haar_dwt_matches_pywavelets(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape)
    bands = haar_dwt(torch.from_numpy(x)).numpy()                              # (B, C, 4, h, w)
    ca, (ch, cv, cd) = pywt.dwt2(x, "haar", axes=(-2, -1))
    assert bands.shape == (*shape[:2], 4, shape[2] // 2, shape[3] // 2)
    assert BANDS == ("LL", "LH", "HL", "HH")
    for index, reference in enumerate((ca, ch, cv, cd)):                       # LL=cA, LH=cH, HL=cV, HH=cD
        assert np.abs(bands[:, :, index] - reference).max() < 1e-12, BANDS[index]


def test_haar_dwt_golden_2x2():
    # x = [[a, b], [c, d]] = [[1, 2], [3, 5]]; orthonormal Haar, 1/2 factor:
    # LL = (a+b+c+d)/2 = 11/2; LH = (a+b-c-d)/2 = -5/2 (top minus bottom: an edge across rows);
    # HL = (a-b+c-d)/2 = -3/2 (left minus right); HH = (a-b-c+d)/2 = 1/2.
    x = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]], dtype=torch.float64)
    bands = haar_dwt(x).flatten()
    assert bands.tolist() == [5.5, -2.5, -1.5, 0.5]


def test_haar_dwt_edges_land_in_the_named_bands():
    # A horizontal edge (rows differ, columns equal) has energy only in LH; a vertical one only in HL.
    horizontal = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).repeat(2, 2)[None, None]   # stripes along W
    vertical = horizontal.transpose(-1, -2)
    for image, band in ((horizontal, 1), (vertical, 2)):
        energy = haar_dwt(image).pow(2).sum(dim=(0, 1, 3, 4))
        assert energy[band] > 0
        assert torch.count_nonzero(energy).item() == 2                            # LL (mean) and that band
        assert energy[0] > 0


def test_haar_dwt_preserves_energy():
    x = torch.randn(2, 3, 32, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(haar_dwt(x).pow(2).sum(), x.pow(2).sum(), rtol=1e-12, atol=0)


def test_haar_idwt_inverts():
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert (haar_idwt(haar_dwt(x)) - x).abs().max() < 1e-12
    bands = torch.randn(1, 2, 4, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert (haar_dwt(haar_idwt(bands)) - bands).abs().max() < 1e-12


def test_haar_dwt_is_differentiable():
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    haar_dwt(x)[:, :, 0].sum().backward()
    # d(sum of LL)/dx = 1/2 everywhere (each pixel belongs to exactly one 2x2 block)
    assert torch.allclose(x.grad, torch.full_like(x, 0.5))


@pytest.mark.parametrize("size", [(7, 8), (8, 7), (5, 5)])
def test_haar_dwt_rejects_odd_sizes(size):
    with pytest.raises(ValueError, match=rf"even height and width, got {size[0]}x{size[1]}"):
        haar_dwt(torch.zeros(1, 1, *size))


def test_subband_input_is_band_major_with_halved_ll():
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = subband_input(x)
    assert out.shape == (2, 12, 4, 3)
    ca, (ch, cv, cd) = pywt.dwt2(x.numpy(), "haar", axes=(-2, -1))             # each (B, 3, 4, 3)
    expected = np.concatenate([ca / 2, ch, cv, cd], axis=1)                    # [R_LL, G_LL, B_LL, R_LH, ...]
    assert np.abs(out.numpy() - expected).max() < 1e-12
    # LL halved = the local 2x2 mean, on the image's own scale
    assert torch.allclose(out[:, :3], F.avg_pool2d(x, 2), atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# ConvNeXt pyramid

CONVNEXT_CHANNELS = {"convnext_atto": (40, 80, 160, 320), "convnext_femto": (48, 96, 192, 384)}   # timm dims


@pytest.mark.parametrize("name", sorted(CONVNEXT_CHANNELS))
def test_frequency_encoder_pyramid(name):
    torch.manual_seed(0)
    convnext, init = create_frequency_backbone(name, in_chans=12, weights="none")
    assert init == "random"
    encoder = FrequencyEncoder(convnext).eval()
    reference_channels = tuple(info["num_chs"] for info in timm.create_model(
        name, pretrained=False, features_only=True, in_chans=12, patch_size=1).feature_info.get_dicts())
    assert encoder.channels == reference_channels == CONVNEXT_CHANNELS[name]

    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        f_stem, f1, f2, f3 = encoder(image)
        # independent reference: timm's own stage outputs on the sub-band input
        reference = convnext.forward_intermediates(subband_input(image), intermediates_only=True)
    c_s, c1, c2, c3 = CONVNEXT_CHANNELS[name]
    assert f_stem.shape == (1, c_s, 112, 112)
    assert f1.shape == (1, c1, 56, 56)
    assert f2.shape == (1, c2, 28, 28)
    assert f3.shape == (1, c3, 14, 14)
    for ours, theirs in zip((f_stem, f1, f2, f3), reference):
        assert torch.allclose(ours, theirs, atol=1e-5)
    # the stem is 1x1 / stride 1 over the 12 sub-band channels
    assert convnext.stem[0].kernel_size == (1, 1) and convnext.stem[0].stride == (1, 1)
    assert convnext.stem[0].in_channels == 12


def test_resized_convnext_has_the_asked_stages_and_refuses_imagenet_weights(tmp_path):
    """The mini preset's encoder: depths (1, 1, 2, 1), dims (32, 64, 128, 256) instead of timm's (2, 2, 6, 2)."""
    convnext, init = create_frequency_backbone("convnext_atto", 12, "auto", depths=(1, 1, 2, 1), dims=(32, 64, 128, 256))
    assert init == "random"     # "auto" never looks for ImageNet weights that cannot fit
    assert [len(stage.blocks) for stage in convnext.stages] == [1, 1, 2, 1]
    encoder = FrequencyEncoder(convnext).eval()
    assert encoder.channels == (32, 64, 128, 256)
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in encoder(torch.zeros(1, 3, 224, 224))]
    assert shapes == [(1, 32, 112, 112), (1, 64, 56, 56), (1, 128, 28, 28), (1, 256, 14, 14)]
    with pytest.raises(ValueError, match="do not fit"):
        create_frequency_backbone("convnext_atto", 12, str(tmp_path / "imagenet.safetensors"), depths=(1, 1, 2, 1))


# ---------------------------------------------------------------------------------------------------------
# ImageNet patch stem -> sub-band stem


def _summed_2x2_kernel(patch_weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 4, 4) -> (O, I, 2, 2): each 2x2 block of the 4x4 kernel summed (independent of the code)."""
    o, i = patch_weight.shape[:2]
    return patch_weight.reshape(o, i, 2, 2, 2, 2).sum(dim=(3, 5))


def test_fused_haar_stem_equals_dwt_then_1x1_stem_in_float64():
    # The encoder's 2x2 stride-2 conv must be the very function "Haar DWT, then the 1x1 stem", values and gradients
    # alike: in float64 both are exact up to ~1e-15 relative, so any wrong band, sign, scale or channel order shows.
    convnext = timm.create_model("convnext_atto", pretrained=False, in_chans=12, patch_size=1, num_classes=0).double()
    encoder = FrequencyEncoder(convnext)
    image = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3),
                        requires_grad=True)
    fused = encoder.stem(image)
    reference = convnext.stem(subband_input(image))
    assert fused.shape == reference.shape == (2, 40, 8, 8)
    assert torch.allclose(fused, reference, rtol=0, atol=1e-12)
    cotangent = torch.randn_like(fused)
    grads = torch.autograd.grad(fused, (image, convnext.stem[0].weight), cotangent)
    grads_reference = torch.autograd.grad(reference, (image, convnext.stem[0].weight), cotangent)
    for ours, theirs in zip(grads, grads_reference):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    # hand check of one entry: the kernel of output channel 0 on image channel 1 at pixel (0, 1) is
    # sum_b w[0, 3b + 1] * scale_b * H_b[0, 1] with scale (1/2, 1, 1, 1) and H[.., 0, 1] = (1, 1, -1, -1) / 2
    w = convnext.stem[0].weight[:, :, 0, 0]
    expected = (0.5 * w[0, 1] + w[0, 4] - w[0, 7] - w[0, 10]) / 2
    assert torch.isclose(haar_stem_kernel(convnext.stem[0].weight, 3)[0, 1, 0, 1], expected, rtol=0, atol=1e-15)


def test_haar_stem_weights_reproduce_the_patch_conv():
    patch = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    image = torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(7))
    mapped = haar_stem_weights(patch, image_channels=3)
    assert mapped.shape == (8, 12, 1, 1)
    via_bands = F.conv2d(subband_input(image), mapped)                          # 1x1 on the sub-bands
    via_image = F.conv2d(image, _summed_2x2_kernel(patch), stride=2)             # 2x2/s2 on the pixels
    assert via_bands.shape == via_image.shape == (2, 8, 8, 6)
    assert torch.allclose(via_bands, via_image, atol=1e-5, rtol=1e-5)
    # a constant image: the mapped stem keeps the pretrained stem's DC response (sum of the 4x4 kernel)
    flat = torch.ones(1, 3, 4, 4)
    assert torch.allclose(F.conv2d(subband_input(flat), mapped)[0, :, 0, 0], patch.sum(dim=(1, 2, 3)), atol=1e-5)


def test_haar_stem_weights_grayscale_from_rgb_kernel():
    # A 3-channel (RGB) kernel mapped onto 1 image channel answers a gray image like the RGB kernel answers
    # that gray image replicated to 3 channels.
    patch = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    gray = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    mapped = haar_stem_weights(patch, image_channels=1)
    assert mapped.shape == (5, 4, 1, 1)
    expected = F.conv2d(gray.expand(-1, 3, -1, -1), _summed_2x2_kernel(patch), stride=2)
    assert torch.allclose(F.conv2d(subband_input(gray), mapped), expected, atol=1e-5)


def test_create_frequency_backbone_loads_imagenet_style_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    imagenet = timm.create_model("convnext_atto", pretrained=False)             # 3 channels, 4x4 patch stem
    state = {k: v.contiguous() for k, v in imagenet.state_dict().items()}
    path = tmp_path / "atto.safetensors"
    save_file(state, str(path))
    model, init = create_frequency_backbone("convnext_atto", in_chans=12, weights=str(path))
    assert init == "imagenet:atto.safetensors"
    loaded = model.state_dict()
    assert torch.equal(loaded["stem.0.weight"], haar_stem_weights(state["stem.0.weight"], 3))
    for key in ("stem.0.bias", "stem.1.weight", "stages.3.blocks.1.mlp.fc2.weight"):
        assert torch.equal(loaded[key], state[key]), key
    # and the whole stem really answers like the pretrained one on 2x-upsampled content
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    upsampled = F.interpolate(image, scale_factor=2, mode="nearest")
    with torch.no_grad():
        ours = model.stem(subband_input(image))
        theirs = imagenet.stem(upsampled)
    assert ours.shape == theirs.shape == (1, 40, 16, 16)
    assert torch.allclose(ours, theirs, atol=1e-4)
