"""BraTS converter on tiny synthetic cases written in the real formats (DATA.md §7).

Each volume is 24 x 24 x 12 (upscaled to 224), LPS as in BraTS, with labels in known boxes, so the
expected stored masks follow from the documented nearest-neighbour mapping, computed here independently.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from freqmedclip.data.converters import brats
from freqmedclip.data.format import read_manifest

SHAPE = (24, 24, 12)        # (x -> left, y -> posterior, z -> superior)
SIZE = 224
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS = np.diag([1.0, 1.0, 1.0, 1.0])
TUMOUR_SLICES = [4, 5, 6, 7]
NEGATIVE_POOL = {1, 2, 8, 9, 10}


def make_labels(et: int = 4) -> np.ndarray:
    """Label volume (x, y, z): oedema box, ET ring around an NCR core on z=4..6, only oedema on z=7,
    a 2-pixel tumour speck on z=3 (dropped: below --min-tumour-pixels)."""
    seg = np.zeros(SHAPE, np.uint8)
    seg[6:16, 5:15, 4:8] = 2
    seg[7:13, 6:12, 4:7] = et
    seg[8:12, 7:11, 4:7] = 1
    seg[10:12, 10, 3] = 2
    return seg


def make_modalities(seg: np.ndarray) -> dict[str, np.ndarray]:
    """Piecewise-constant int16 volumes: zero outside the brain box x[3,21) y[2,22) z[1,11)."""
    out = {}
    for m, (base, ncr, ed, et) in {"flair": (100, 150, 400, 250), "t1": (300, 200, 250, 300),
                                   "t1ce": (200, 120, 180, 600), "t2": (150, 500, 450, 300)}.items():
        v = np.zeros(SHAPE, np.int16)
        v[3:21, 2:22, 1:11] = base
        v[seg == 1], v[seg == 2], v[(seg == 4) | (seg == 3)] = ncr, ed, et
        out[m] = v
    return out


def save(array: np.ndarray, path: Path, affine: np.ndarray = LPS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def write_case(folder: Path, case: str, ext: str = ".nii.gz", *, affine=LPS, seg_name=None, et: int = 4,
               names=None, skip=(), seg=None) -> None:
    seg = make_labels(et) if seg is None else seg
    vols = make_modalities(make_labels())
    if affine is RAS:  # same anatomy, stored in RAS order (x and y reversed)
        vols = {k: v[::-1, ::-1] for k, v in vols.items()}
        seg = seg[::-1, ::-1]
    names = names or {m: f"{case}_{m}{ext}" for m in ("flair", "t1", "t1ce", "t2", "seg")}
    for m, v in vols.items():
        if m not in skip:
            save(v, folder / names[m], affine)
    save(seg, folder / (seg_name or names["seg"]), affine)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats_raw")
    train = root / "MICCAI_BraTS2020_TrainingData"
    write_case(train / "BraTS20_Training_001", "BraTS20_Training_001")
    write_case(train / "BraTS20_Training_002", "BraTS20_Training_002", ".nii", affine=RAS)
    write_case(train / "BraTS20_Training_355", "BraTS20_Training_355", ".nii", seg_name="W39_1998.09.19_Segm.nii")
    gli = "BraTS-GLI-00001-000"
    write_case(root / "gli" / gli, gli, et=3, names={m: f"{gli}-{s}.nii.gz" for m, s in
               [("flair", "t2f"), ("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("seg", "seg")]})
    write_case(train / "BraTS20_Training_010", "BraTS20_Training_010", skip=("t2",))
    write_case(train / "BraTS20_Training_011", "BraTS20_Training_011")
    flair = train / "BraTS20_Training_011" / "BraTS20_Training_011_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[: len(flair.read_bytes()) // 2])
    bad_labels = make_labels()
    bad_labels[0, 0, 0] = 3
    write_case(train / "BraTS20_Training_012", "BraTS20_Training_012", seg=bad_labels)
    write_case(train / "BraTS20_Training_013", "BraTS20_Training_013", seg=make_labels()[:, :, :10])
    write_case(root / "val" / "BraTS20_Validation_001", "BraTS20_Validation_001", skip=())
    (root / "val" / "BraTS20_Validation_001" / "BraTS20_Validation_001_seg.nii.gz").unlink()
    (train / "name_mapping.csv").write_text(
        "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,"
        "BraTS_2020_subject_ID\nHGG,Brats17_CBICA_AAB_1,Brats18_CBICA_AAB_1,NA,BraTS19_CBICA_AAB_1,"
        "BraTS20_Training_001\nLGG,NA,NA,NA,NA,BraTS20_Training_002\n")
    return root


def expected_mask(seg_slice_xy: np.ndarray, values: set[int]) -> np.ndarray:
    """Stored mask: rows = y, cols = x; stored pixel (r, c) takes source pixel floor((r + 0.5) * 24 / 224)."""
    img = np.isin(seg_slice_xy.T, list(values))
    idx = [int(np.floor((i + 0.5) * 24 / SIZE)) for i in range(SIZE)]
    return img[np.ix_(idx, idx)]


def load(root: Path, rel: str | None) -> np.ndarray | None:
    return None if rel is None else np.asarray(Image.open(root / rel))


def run(raw: Path, out: Path, *extra: str) -> dict:
    return brats.main(["--root", str(raw), "--out", str(out), "--workers", "1", *extra])


@pytest.fixture(scope="module")
def converted(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("brats_out")
    summary = run(raw, out, "--workers", "2")
    return out, summary


def test_good_cases_convert_and_bad_ones_are_reported(converted):
    out, summary = converted
    assert summary["converted"] == 4 and summary["resumed"] == 0
    reasons = {s["case"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"BraTS20_Training_010", "BraTS20_Training_011", "BraTS20_Training_012",
                            "BraTS20_Training_013", "BraTS20_Validation_001"}
    assert "t2" in reasons["BraTS20_Training_010"]
    assert "BraTS20_Training_011_flair.nii.gz" in reasons["BraTS20_Training_011"]
    assert "BraTS20_Training_012_seg.nii.gz" in reasons["BraTS20_Training_012"] and "[3]" in reasons[
        "BraTS20_Training_012"]
    assert "shape" in reasons["BraTS20_Training_013"] and "BraTS20_Training_013_" in reasons["BraTS20_Training_013"]
    assert "segmentation" in reasons["BraTS20_Validation_001"]
    assert any("W39_1998.09.19_Segm.nii" in n for n in summary["notes"])
    saved = json.loads((out / "conversion_brain.json").read_text())
    assert saved["skipped"] == summary["skipped"]


def test_slice_selection_and_exact_structure_masks(converted):
    out, _ = converted
    records = [r for r in read_manifest(out) if r.subject_id == "BraTS20_Training_001"]
    slices = sorted({int(r.sample_id[-3:]) for r in records})
    negatives = [k for k in slices if k not in TUMOUR_SLICES]
    assert [k for k in slices if k in TUMOUR_SLICES] == TUMOUR_SLICES   # z=3 speck and brain-free z=0, 11 dropped
    assert len(negatives) == 2 and set(negatives) <= NEGATIVE_POOL
    seg = make_labels()
    regions = {"whole_tumour": {1, 2, 4}, "tumour_core": {1, 4}, "enhancing_tumour": {4},
               "necrotic_core": {1}, "oedema": {2}}
    for r in records:
        k = int(r.sample_id[-3:])
        want = expected_mask(seg[:, :, k], regions[r.structure])
        got = load(out, r.mask)
        if not want.any():
            assert got is None, (r.sample_id, r.structure)
        else:
            assert np.array_equal(got > 127, want), (r.sample_id, r.structure)
        assert r.spacing_mm == pytest.approx((24 / SIZE, 24 / SIZE))
        assert r.original_size == (24, 24) and r.modality == "MRI" and r.dataset == "brain"
        assert len(r.prompts) >= 3 and r.prompts[0] == brats.PROMPTS[r.structure][0]
    z7 = {r.structure: r for r in records if r.sample_id.endswith("z007")}
    assert z7["enhancing_tumour"].mask is None and z7["oedema"].mask is not None
    assert "oedema" in z7["oedema"].caption and "enhancing" not in z7["oedema"].caption


def test_image_is_zscore_in_brain_mapped_to_uint8(converted):
    out, _ = converted
    vols = make_modalities(make_labels())
    image = np.asarray(Image.open(out / "images" / "brats_BraTS20_Training_001_z005.png"))
    assert image.shape == (SIZE, SIZE, 3)
    r = c = int(9 * SIZE / 24)                  # stored (84, 84) samples source x, y in {8, 9}: NCR core
    for channel, m in enumerate(("flair", "t1ce", "t2")):
        v = vols[m].astype(np.float64)
        brain = v[v != 0]
        z = (v[9, 9, 5] - brain.mean()) / brain.std()
        want = (np.clip(z, -3, 3) + 3) / 6 * 255
        assert abs(int(image[r, c, channel]) - want) <= 1, m
    assert (image[:5, :5] == 0).all()           # background outside the brain stays 0


def test_orientation_misnamed_seg_and_2023_labels_give_identical_samples(converted):
    out, _ = converted
    by_case = {}
    for r in read_manifest(out):
        by_case.setdefault(r.subject_id, {})[(r.sample_id.split("_z")[-1], r.structure)] = r
    ref = by_case["BraTS20_Training_001"]
    tumour_keys = {k for k in ref if int(k[0]) in TUMOUR_SLICES}
    for other in ("BraTS20_Training_002", "BraTS20_Training_355", "BraTS-GLI-00001"):  # GLI: patient, not timepoint
        recs = by_case[other]
        assert tumour_keys <= set(recs), other
        for key in tumour_keys:
            a, b = ref[key], recs[key]
            assert np.array_equal(load(out, a.image), load(out, b.image)), (other, key)
            assert (a.mask is None) == (b.mask is None), (other, key)
            if a.mask is not None:
                assert np.array_equal(load(out, a.mask), load(out, b.mask)), (other, key)


def test_split_is_by_subject(converted):
    out, _ = converted
    split_of = {}
    for r in read_manifest(out):
        assert split_of.setdefault(r.subject_id, r.split) == r.split
    assert set(split_of.values()) <= {"train", "val", "test"} and len(split_of) == 4


def test_rerun_resumes_and_redoes_only_unfinished_cases(raw, tmp_path):
    out = tmp_path / "out"
    first = run(raw, out)
    manifest = (out / "manifest.jsonl").read_text()
    again = run(raw, out)
    assert again["converted"] == 0 and again["resumed"] == 4
    assert (out / "manifest.jsonl").read_text() == manifest

    # a sample file lost after the case finished: that case alone is converted again
    lost = out / "images" / "brats_BraTS20_Training_355_z005.png"
    lost.unlink()
    third = run(raw, out)
    assert third["converted"] == 1 and third["resumed"] == 3 and lost.is_file()
    assert (out / "manifest.jsonl").read_text() == manifest
    assert not list(out.rglob("*.tmp"))

    # other options: finished cases are stale and converted again; their old samples are removed
    fourth = run(raw, out, "--negatives-per-case", "0")
    assert fourth["converted"] == 4 and fourth["resumed"] == 0
    images = {p.name for p in (out / "images").iterdir()}
    assert len(images) == 4 * len(TUMOUR_SLICES)
    assert first["samples"] != fourth["samples"]


def test_interrupted_run_continues_where_it_stopped(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = brats.write_sample, []

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 8:                     # inside the second case (6 samples per case)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(brats, "write_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(raw, out)
    monkeypatch.undo()
    markers = list((out / ".convert" / "brain").glob("*.json"))
    assert len(markers) == 1 and not (out / "manifest.jsonl").exists()
    assert not list(out.rglob("*.tmp"))
    summary = run(raw, out)
    assert summary["resumed"] == 1 and summary["converted"] == 3
    assert len({r.sample_id for r in read_manifest(out)}) == 4 * 6


def test_other_datasets_in_a_shared_root_are_kept(raw, tmp_path):
    out = tmp_path / "shared"
    run(raw, out)
    run(raw, out, "--dataset-name", "brain2", "--structures", "whole_tumour", "--limit", "1")
    datasets = {r.dataset for r in read_manifest(out)}
    assert datasets == {"brain", "brain2"}


def test_gli_timepoints_of_one_patient_share_a_subject():
    from freqmedclip.data.converters.brats import patient_id

    assert patient_id("BraTS-GLI-00123-000") == patient_id("BraTS-GLI-00123-001") == "BraTS-GLI-00123"
    assert patient_id("BraTS20_Training_001") == "BraTS20_Training_001"
