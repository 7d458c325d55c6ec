"""The demo's pure functions: file loaders for every format, bad uploads, the workbench maths, mask export,
and one full update of every panel on a decisive mini model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _demo_support import (
    EXAMPLES,
    decisive_model,
    phantom_image,
    write_dicom,
    write_nifti,
    write_nifti_header,
    write_png_header,
)
from PIL import Image

from freqmedclip.demo.session import (
    CONTROL_PROMPT,
    DemoSession,
    SetupError,
    Workbench,
    load_session,
    pairwise_iou,
    parse_prompts,
    text_reliance,
)
from freqmedclip.demo.uploads import (
    Limits,
    export_mask_nifti,
    export_mask_png,
    load_upload,
    mask_volume,
    nifti_unview,
    nifti_view,
    sniff_format,
)
from freqmedclip.modeling.model import Switches
from freqmedclip.inference.predictor import Predictor
from freqmedclip.inference.preprocess import WINDOW_PRESETS, InputError, normalize

nib = pytest.importorskip("nibabel")   # in requirements.txt; a package-only install (no demo) skips NIfTI


# ---------------------------------------------------------------- pictures

@pytest.mark.parametrize("mode, suffix", [("L", "png"), ("RGB", "png"), ("RGBA", "png"), ("L", "jpg"),
                                          ("RGB", "jpg"), ("L", "tif"), ("RGB", "tif"), ("RGBA", "tif")])
def test_8bit_pictures_load_as_the_model_sees_them(tmp_path, mode, suffix):
    gray = phantom_image(80)
    image = Image.fromarray(gray).convert(mode)
    path = tmp_path / f"picture.{suffix}"
    image.save(path)
    loaded = load_upload(path)
    assert loaded.kind == {"png": "png", "jpg": "jpeg", "tif": "tiff"}[suffix]
    assert loaded.size == (80, 80) and loaded.display.shape == (80, 80, 3) and loaded.display.dtype == np.uint8
    assert loaded.array.shape[-1] in (1, 3) and loaded.modality == "auto" and loaded.geometry is None
    if suffix != "jpg":  # lossless: the display is the 8-bit image itself (auto = / 255)
        assert np.array_equal(loaded.display[..., 0], gray)


def test_16bit_gray_tiff_keeps_16_bits(tmp_path):
    pixels = (np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) * 21).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "gray16.tif")
    loaded = load_upload(tmp_path / "gray16.tif")
    assert loaded.array.dtype == np.uint16 and np.array_equal(loaded.array[..., 0], pixels)
    expected = np.round(normalize(pixels[..., None], "auto") * 255).astype(np.uint8)[..., 0]
    assert np.array_equal(loaded.display[..., 0], expected)               # 16-bit: min-max, not / 255


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_rgb_and_rgba_tiff_keep_16_bits(tmp_path, channels):
    import SimpleITK as sitk

    pixels = np.random.default_rng(channels).integers(0, 65535, (40, 52, channels), dtype=np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(tmp_path / "color16.tif"))
    loaded = load_upload(tmp_path / "color16.tif")
    assert loaded.kind == "tiff" and loaded.array.dtype == np.uint16
    assert np.array_equal(loaded.array, pixels[..., :3])                   # alpha dropped, 16 bits kept


def test_format_comes_from_magic_bytes_not_the_name(tmp_path):
    path = write_dicom(tmp_path / "scan.png", np.full((40, 40), 1000, np.uint16))
    assert sniff_format(path) == "dicom" and load_upload(path).kind == "dicom"


# ---------------------------------------------------------------- DICOM

def test_dicom_ct_rescale_window_and_geometry(tmp_path):
    stored = np.linspace(0, 2048, 50 * 60).reshape(50, 60).astype(np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=1.0, intercept=-1024.0, window=(40.0, 400.0))
    loaded = load_upload(path)                                              # window "auto" = the file's own
    assert loaded.modality == "CT" and loaded.window == (40.0, 400.0)
    np.testing.assert_allclose(loaded.array[..., 0], stored.astype(np.float32) - 1024.0)   # Hounsfield units
    hu = stored.astype(np.float32) - 1024.0
    expected = np.clip((hu - (40 - 200)) / 400, 0, 1)
    np.testing.assert_allclose(loaded.display[..., 0] / 255.0, expected, atol=1 / 255)
    assert loaded.spacing_mm == (0.7, 0.8)
    lung = load_upload(path, window="lung")
    assert lung.window == WINDOW_PRESETS["lung"]
    assert load_upload(path, window="full range").window is None
    # voxel (column, row) -> RAS: LPS position (-100, -120, 30) flipped in x and y; columns step 0.8 mm along x
    affine = loaded.geometry.affine
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [100.0, 120.0, 30.0, 1.0])
    np.testing.assert_allclose(affine @ [1, 0, 0, 1], [100.0 - 0.8, 120.0, 30.0, 1.0])
    np.testing.assert_allclose(affine @ [0, 1, 0, 1], [100.0, 120.0 - 0.7, 30.0, 1.0])


def test_dicom_monochrome1_is_inverted(tmp_path):
    stored = np.tile(np.arange(0, 64, dtype=np.uint16) * 64, (40, 1))
    path = write_dicom(tmp_path / "mg.dcm", stored, modality="MG", intercept=0.0, window=None,
                       photometric="MONOCHROME1")
    loaded = load_upload(path)
    assert loaded.modality == "MG" and "MONOCHROME1 inverted" in loaded.describe()
    row = loaded.display[0, :, 0].astype(int)
    assert row[0] == 255 and row[-1] == 0 and np.all(np.diff(row) <= 0)   # high stored value = dark


# ---------------------------------------------------------------- NIfTI

def test_nifti_slice_and_axis(tmp_path):
    volume = np.arange(36 * 40 * 34, dtype=np.float32).reshape(36, 40, 34)
    path = write_nifti(tmp_path / "vol.nii.gz", volume)
    axial = load_upload(path, slice_index=3, axis=2, modality="MRI")
    assert axial.n_slices == 34 and axial.slice_index == 3
    np.testing.assert_array_equal(axial.array[..., 0], np.rot90(volume[:, :, 3]))
    assert axial.spacing_mm == pytest.approx((1.1, 0.9))                  # rows follow axis 1, columns axis 0
    sagittal = load_upload(path, slice_index=5, axis=0)
    assert sagittal.n_slices == 36 and sagittal.modality == "MRI"           # auto: no value below -500 HU
    np.testing.assert_array_equal(sagittal.array[..., 0], np.rot90(volume[5]))
    assert load_upload(path).slice_index == 17                              # default: the middle slice
    ct = load_upload(write_nifti(tmp_path / "ct.nii", volume - 1024.0))
    assert ct.modality == "CT"


def test_nifti_view_round_trip():
    slab = np.arange(12).reshape(3, 4)
    assert np.array_equal(nifti_unview(nifti_view(slab)), slab)


def test_export_nifti_keeps_the_affine_and_places_the_mask(tmp_path):
    volume = np.random.default_rng(0).normal(size=(36, 44, 8)).astype(np.float32)
    affine = np.array([[0, -1.2, 0, 40.0], [0.9, 0, 0, -30.0], [0, 0, 3.0, 12.0], [0, 0, 0, 1]])
    loaded = load_upload(write_nifti(tmp_path / "vol.nii.gz", volume, affine), slice_index=6, axis=2)
    mask = np.zeros(loaded.size, bool)
    mask[4:10, 7:20] = True
    path = export_mask_nifti(mask, loaded, tmp_path / "out")
    saved = nib.load(str(path))
    np.testing.assert_allclose(saved.affine, affine)
    data = np.asarray(saved.dataobj)
    assert data.shape == volume.shape and data.dtype == np.uint8
    assert np.array_equal(data[:, :, 6].astype(bool), nifti_unview(mask)) and data.sum() == mask.sum()
    assert not any(p.name.startswith("partial-") for p in (tmp_path / "out").iterdir())   # atomic: no leftovers


def test_export_nifti_from_dicom_and_png(tmp_path):
    loaded = load_upload(write_dicom(tmp_path / "ct.dcm", np.full((36, 40), 1000, np.uint16)))
    mask = np.zeros((36, 40), bool)
    mask[2:5, 10:30] = True
    saved = nib.load(str(export_mask_nifti(mask, loaded, tmp_path)))
    np.testing.assert_allclose(saved.affine, loaded.geometry.affine)
    assert np.array_equal(np.asarray(saved.dataobj)[:, :, 0].T.astype(bool), mask)
    assert np.array_equal(mask_volume(mask, loaded.geometry)[:, :, 0].T.astype(bool), mask)
    png = export_mask_png(mask, tmp_path, "ct.dcm")
    assert np.array_equal(np.asarray(Image.open(png)) > 0, mask)
    picture = load_upload(EXAMPLES / "lung_nodule.png")
    with pytest.raises(InputError, match="NIfTI or DICOM"):
        export_mask_nifti(np.zeros(picture.size, bool), picture, tmp_path)


# ---------------------------------------------------------------- bad uploads

def _bad_uploads(tmp_path):
    (tmp_path / "notes.png").write_text("these are my notes, not an image\n" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 20)
    good = tmp_path / "good.png"
    Image.fromarray(phantom_image(128)).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    return {
        "not an image": (tmp_path / "notes.png", "not an image", {}),
        "empty file": (tmp_path / "empty.png", "empty", {}),
        "corrupt DICOM": (tmp_path / "corrupt.dcm", "corrupt DICOM", {}),
        "truncated PNG": (tmp_path / "truncated.png", "corrupt or truncated", {}),
        "50,000 x 50,000 px": (write_png_header(tmp_path / "huge.png", 50_000, 50_000), "too large", {}),
        "over --max-pixels": (write_png_header(tmp_path / "big.png", 5_000, 4_000), "over the limit", {}),
        "huge NIfTI": (write_nifti_header(tmp_path / "huge.nii", (4096, 4096, 4096)), "voxels, over the limit", {}),
        "over --max-upload-mb": (good, "over the upload limit", {"limits": Limits(max_upload_mb=0.001)}),
        "slice out of range": (write_nifti(tmp_path / "v.nii", np.zeros((40, 40, 4), np.float32)), "outside",
                               {"slice_index": 9}),
        "unknown window": (good, "unknown window", {"window": "spleen"}),
        "missing file": (tmp_path / "nothing.png", "not found", {}),
    }


@pytest.mark.parametrize("case", ["not an image", "empty file", "corrupt DICOM", "truncated PNG", "50,000 x 50,000 px",
                                  "over --max-pixels", "huge NIfTI", "over --max-upload-mb", "slice out of range",
                                  "unknown window", "missing file"])
def test_bad_uploads_raise_a_readable_input_error(tmp_path, case):
    path, message, kwargs = _bad_uploads(tmp_path)[case]
    kwargs.setdefault("limits", Limits(max_pixels=10_000_000))
    with pytest.raises(InputError, match=message):
        load_upload(path, **kwargs)


# ---------------------------------------------------------------- workbench maths

def test_pairwise_iou_and_text_reliance_on_hand_made_masks():
    masks = np.zeros((4, 4, 4), bool)
    masks[0, :2, :] = True          # top half: 8 px
    masks[1, :, :2] = True          # left half: 8 px, overlaps the top half in 4 px
    masks[3, :2, :] = True          # control = top half
    iou = pairwise_iou(masks)
    expected = np.array([[1, 4 / 12, 0, 1], [4 / 12, 1, 0, 4 / 12], [0, 0, 1, 0], [1, 4 / 12, 0, 1]])
    np.testing.assert_allclose(iou, expected)
    assert pairwise_iou(np.zeros((2, 3, 3), bool))[0, 1] == 1.0          # two empty masks are identical
    # mean IoU with the control over prompts 0, 1, 2 = (1 + 1/3 + 0) / 3
    assert text_reliance(iou, control=3) == pytest.approx(1 - (1 + 1 / 3 + 0) / 3)
    ignored = np.repeat(masks[:1], 3, axis=0)
    assert text_reliance(pairwise_iou(ignored), control=2) == 0.0       # every prompt gives the control's mask


def test_workbench_statistics():
    probabilities = np.zeros((3, 10, 10), np.float32)
    probabilities[0, :5] = 0.8
    probabilities[1, :, :5] = 0.6
    probabilities[2] = 0.1                                               # control: nothing
    bench = Workbench.from_maps(["a", "b", "nonsense"], probabilities, threshold=0.5)
    np.testing.assert_allclose(bench.area_fraction, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(bench.mean_probability, [0.8, 0.6, 0.0], atol=1e-6)
    assert bench.text_reliance == pytest.approx(1.0)                     # both prompts differ from the empty control
    headers, rows = bench.iou_rows()
    assert headers == ["prompt", "#1", "#2", "control"] and rows[0][2] == pytest.approx(25 / 75, abs=1e-3)
    assert [row[0] for row in rows] == ["#1 a", "#2 b", "control: nonsense"]   # short headers, full row names
    assert bench.stats_rows()[1][2] == ["control: nonsense", 0.0, 0.0, 1.0]


def test_parse_prompts():
    assert parse_prompts(" tumour \n\n core; tumour\noedema ") == ["tumour", "core", "oedema"]
    with pytest.raises(InputError, match="at most 6"):
        parse_prompts("\n".join(f"p{i}" for i in range(7)))


# ---------------------------------------------------------------- a full update on a decisive mini model

@pytest.fixture(scope="module")
def session(mini_backbone, tmp_path_factory):
    models = [decisive_model(mini_backbone, seed) for seed in (0, 1)]
    return DemoSession(Predictor(models), exports=tmp_path_factory.mktemp("exports"))


def test_full_update_fills_every_panel(session):
    loaded = session.load(EXAMPLES / "brain_whole_tumour.png")
    steps = []
    panels = session.update(loaded, "whole tumour", workbench_prompts="whole tumour\ntumour core\nlesion",
                            progress=lambda fraction, message: steps.append(fraction))
    assert steps == sorted(steps) and len(steps) >= 4
    h, w = panels.view.shape[:2]
    for image in (panels.probability, panels.uncertainty, panels.cam_semantic, panels.cam_frequency):
        assert image.dtype == np.uint8 and image.shape[1] == w and image.shape[0] > h      # map + colour bar
    assert list(panels.subbands) == ["LL", "LH", "HL", "HH"] and list(panels.branches) == ["semantic", "frequency"]
    for image in [*panels.subbands.values(), *panels.branches.values()]:
        assert image.dtype == np.uint8 and image.ndim == 3
    assert panels.found == panels.mask.any()
    assert panels.mask.shape == loaded.size and panels.exports[0].suffix == ".png"
    bench = panels.workbench
    assert bench.prompts == ["whole tumour", "tumour core", "lesion", CONTROL_PROMPT]
    assert bench.iou.shape == (4, 4) and np.allclose(np.diag(bench.iou), 1) and len(bench.gallery) == 4
    assert 0.0 <= bench.text_reliance <= 1.0
    # the workbench's batched forward equals one prompt at a time
    alone = session.predictor.predict_tensor(session.prepare(loaded), ["tumour core"])["probability"][0, 0]
    # batched vs single-row fp32 kernels: |dp| <= FP32_LOGIT_REL * max|z| / 4 <= 4.3e-4 (tests/_tolerances.py)
    np.testing.assert_allclose(bench.probabilities[1], alone.numpy(), atol=4.3e-4)


def test_ablation_switches_change_the_mask_and_report_it(session):
    loaded = session.load(EXAMPLES / "lung_nodule.png")
    tensor = session.prepare(loaded)
    maps = {switches: session.predictor.predict_tensor(tensor, ["lung nodule"], switches)["probability"]
            for switches in (Switches(), Switches(frequency=False), Switches(ffbi=False), Switches(film=False))}
    reference = maps.pop(Switches())
    assert all(not torch.allclose(reference, other) for other in maps.values())   # each toggle changes the map
    no_frequency = session.update(loaded, "lung nodule", switches=Switches(frequency=False))
    assert "Ablation" in no_frequency.verdict and "frequency stream" in no_frequency.verdict
    assert no_frequency.cam_frequency is None and no_frequency.cam_semantic is not None
    np.testing.assert_allclose(session.view(loaded).shape[:2], no_frequency.view.shape[:2])


def test_no_target_verdict(mini_backbone, tmp_path):
    session = DemoSession(Predictor(decisive_model(mini_backbone, empty=True)), exports=tmp_path)
    panels = session.update(session.load(EXAMPLES / "breast_mass.png"), "breast mass")
    assert not panels.found and "No target found" in panels.verdict


def test_ffbi_explorer_both_directions(session):
    loaded = session.load(EXAMPLES / "brain_whole_tumour.png")
    to_frequency, to_semantic, caption = session.explore(loaded, "whole tumour", x=30.0, y=200.0)
    assert to_frequency.shape == to_semantic.shape and to_frequency.shape[1] == 224
    assert "row 12, col 1" in caption
    assert not np.array_equal(to_frequency, to_semantic)


def test_dicom_update_exports_png_and_nifti(session, tmp_path):
    stored = (phantom_image(64).astype(np.uint16) * 8)
    loaded = session.load(write_dicom(tmp_path / "ct.dcm", stored))
    panels = session.update(loaded, "lung nodule")
    assert [p.suffix for p in panels.exports] == [".png", ".gz"]
    saved = nib.load(str(panels.exports[1]))
    np.testing.assert_allclose(saved.affine, loaded.geometry.affine)


def test_segment_api_logic(session):
    mask, overlay, info = session.segment(EXAMPLES / "lung_nodule.png", "lung nodule")
    assert mask.shape == (224, 224) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert overlay.shape == (224, 224, 3) and info["found"] == bool(mask.any()) and info["checkpoints"] == 2
    with pytest.raises(InputError, match="prompt is empty"):
        session.segment(EXAMPLES / "lung_nodule.png", "   ")


def test_load_session_without_checkpoints_explains_what_to_do(tmp_path):
    with pytest.raises(SetupError, match="No FreqMedCLIP checkpoint found(.|\n)*--checkpoint DIR"):
        load_session(None, search=tmp_path)
    with pytest.raises(SetupError, match="no config.json"):
        load_session([tmp_path / "missing"])


def test_benchmark_script_runs():
    from freqmedclip.demo.benchmark import main as benchmark

    (result,) = benchmark(["--members", "1", "--warmup", "0", "--repeats", "1"])
    assert result["members"] == 1 and result["median_ms"] > 0
    assert set(result["stages_ms"]) == {"prepare", "forward+gradcam", "render", "export"}
