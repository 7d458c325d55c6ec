"""LUNA16 converter on tiny synthetic CT series written as real MetaImage files (DATA.md §3, §7).

Series A has identity direction; series B is the same physical scene stored with the x/y-flipped
direction matrix of some LUNA scans (array reversed, origin moved), annotated with the same world
coordinates; the two must give identical slices and sphere masks centred on the right pixel.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from freqmedclip.data.converters import luna16
from freqmedclip.data.format import read_manifest

NX, NY, NZ = 40, 36, 16
SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-14.0, -20.0, -100.0)
SIZE = 224
NODULES_IJK = [((12.3, 20.6, 7.2), 6.0), ((30.0, 8.0, 3.0), 4.0)]   # continuous voxel index, diameter mm
UID_A, UID_B = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100", "1.3.6.1.4.1.14519.5.2.1.6279.6001.200"
UID_EMPTY, UID_TRUNC, UID_OUTSIDE, UID_NORAW = (f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{n}" for n in (300, 400, 500, 600))


def world(ijk) -> np.ndarray:
    return np.array(ORIGIN) + np.array(SPACING) * np.array(ijk)


def scene() -> np.ndarray:
    """HU volume (z, y, x): air -1000 at the border, lung -800 inside, nodules +50 HU spheres."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in (NZ, NY, NX)), indexing="ij")
    hu = np.full((NZ, NY, NX), -1000, np.int16)
    hu[:, 2:-2, 2:-2] = -800
    pts = np.stack([x, y, z], -1) * np.array(SPACING)
    for ijk, d in NODULES_IJK:
        hu[((pts - np.array(ijk) * np.array(SPACING)) ** 2).sum(-1) <= (d / 2) ** 2] = 50
    return hu


def write_series(path: Path, hu: np.ndarray, flipped: bool = False) -> None:
    image = sitk.GetImageFromArray(hu[:, ::-1, ::-1].copy() if flipped else hu)
    image.SetSpacing(SPACING)
    if flipped:
        image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
        image.SetOrigin((ORIGIN[0] + SPACING[0] * (NX - 1), ORIGIN[1] + SPACING[1] * (NY - 1), ORIGIN[2]))
    else:
        image.SetOrigin(ORIGIN)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("luna_raw")
    hu = scene()
    write_series(root / "subset0" / f"{UID_A}.mhd", hu)
    write_series(root / "subset1" / f"{UID_B}.mhd", hu, flipped=True)
    write_series(root / "subset1" / f"{UID_EMPTY}.mhd", np.where(hu == 50, -800, hu).astype(np.int16))
    write_series(root / "subset2" / f"{UID_TRUNC}.mhd", hu)
    raw_file = root / "subset2" / f"{UID_TRUNC}.raw"
    raw_file.write_bytes(raw_file.read_bytes()[:1000])
    write_series(root / "subset2" / f"{UID_OUTSIDE}.mhd", hu)
    write_series(root / "subset2" / f"{UID_NORAW}.mhd", hu)
    (root / "subset2" / f"{UID_NORAW}.raw").unlink()
    lungs = sitk.GetImageFromArray((hu > -900).astype(np.uint8) * 3)
    (root / "seg-lungs-LUNA16").mkdir()
    sitk.WriteImage(lungs, str(root / "seg-lungs-LUNA16" / f"{UID_A}.mhd"), useCompression=True)
    with open(root / "annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        for uid in (UID_A, UID_B, UID_TRUNC):
            for ijk, d in NODULES_IJK:
                w.writerow([uid, *world(ijk).round(6), d])
        w.writerow([UID_OUTSIDE, *world((12, 20, 40)), 5.0])
        w.writerow(["1.3.6.1.4.1.14519.5.2.1.6279.6001.999", 0, 0, 0, 5.0])     # series not downloaded
    (root / "candidates_V2.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n")
    return root


@pytest.fixture(scope="module")
def converted(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("luna_out")
    return out, luna16.main(["--root", str(raw), "--out", str(out), "--workers", "2"])


def expected_slices() -> set[int]:
    """Nearest slice of each nodule plus neighbours within 2 that cut the sphere."""
    ks = set()
    for (_, _, kc), d in NODULES_IJK:
        for k in range(round(kc) - 2, round(kc) + 3):
            if k == round(kc) or abs(k - kc) * SPACING[2] < d / 2:
                ks.add(k)
    return ks


def expected_mask(k: int) -> np.ndarray:
    """Independent rasterisation: stored pixel (r, c) <-> voxel ((c + .5) * NX / 224 - .5, (r + .5) * NY / 224 - .5)."""
    c = (np.arange(SIZE) + 0.5) * NX / SIZE - 0.5
    r = (np.arange(SIZE) + 0.5) * NY / SIZE - 0.5
    mask = np.zeros((SIZE, SIZE), bool)
    for (i, j, kc), d in NODULES_IJK:
        dist2 = (((c[None, :] - i) * SPACING[0]) ** 2 + ((r[:, None] - j) * SPACING[1]) ** 2
                 + ((k - kc) * SPACING[2]) ** 2)
        mask |= dist2 <= (d / 2) ** 2
    return mask


def load(out: Path, rel: str | None) -> np.ndarray | None:
    return None if rel is None else np.asarray(Image.open(out / rel))


def by_slice(out: Path, uid: str) -> dict[int, object]:
    return {int(r.sample_id[-3:]): r for r in read_manifest(out) if r.subject_id == uid}


def test_good_series_convert_and_bad_ones_are_reported(converted):
    out, summary = converted
    assert summary["converted"] == 3
    reasons = {s["case"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {UID_TRUNC, UID_OUTSIDE, UID_NORAW}
    assert f"{UID_NORAW}.raw" in reasons[UID_NORAW] and "missing" in reasons[UID_NORAW]
    assert f"{UID_TRUNC}.raw" in reasons[UID_TRUNC] and "truncated" in reasons[UID_TRUNC]
    assert "annotations.csv" in reasons[UID_OUTSIDE] and "outside" in reasons[UID_OUTSIDE]
    assert any("not under --root" in n for n in summary["notes"])
    assert {r.subject_id for r in read_manifest(out)} == {UID_A, UID_B, UID_EMPTY}   # seg-lungs .mhd ignored


def test_nodule_slices_and_sphere_masks_are_exact(converted):
    out, _ = converted
    records = by_slice(out, UID_A)
    positives = {k for k, r in records.items() if r.mask is not None}
    assert positives == expected_slices()
    for k in positives:
        r = records[k]
        assert np.array_equal(load(out, r.mask) > 127, expected_mask(k)), k
        assert r.spacing_mm == pytest.approx((SPACING[1] * NY / SIZE, SPACING[0] * NX / SIZE))
        assert r.original_size == (NY, NX) and r.modality == "CT" and r.structure == "nodule"
        image = load(out, r.image)
        inside = load(out, r.mask) > 127
        assert image[inside].mean() > image[~inside].mean() + 80, k                 # +50 HU vs -800 HU lung
    centre = load(out, records[7].mask) > 127
    rows, cols = np.nonzero(centre)
    (i, j, _), _ = NODULES_IJK[0]
    assert abs(cols.mean() - ((i + 0.5) * SIZE / NX - 0.5)) < 1.5
    assert abs(rows.mean() - ((j + 0.5) * SIZE / NY - 0.5)) < 1.5


def test_negatives_are_far_from_nodules_and_in_lung(converted):
    out, _ = converted
    for uid, count in ((UID_A, 2), (UID_EMPTY, 2)):
        negatives = [k for k, r in by_slice(out, uid).items() if r.mask is None]
        assert len(negatives) == count
        if uid == UID_A:
            for k in negatives:
                for (_, _, kc), d in NODULES_IJK:
                    assert abs(k - kc) * SPACING[2] >= d / 2 + 5.0
    image = load(out, by_slice(out, UID_EMPTY)[negatives[0]].image)
    lung = round((-800 + 1350) / 1500 * 255)
    assert abs(int(image[SIZE // 2, SIZE // 2]) - lung) <= 1                       # HU window then min-max


def test_flipped_direction_gives_the_same_samples(converted):
    out, _ = converted
    a, b = by_slice(out, UID_A), by_slice(out, UID_B)
    pos_a = {k for k, r in a.items() if r.mask is not None}
    assert pos_a == {k for k, r in b.items() if r.mask is not None}
    for k in pos_a:
        assert np.array_equal(load(out, a[k].image), load(out, b[k].image)), k
        assert np.array_equal(load(out, a[k].mask), load(out, b[k].mask)), k


def test_rerun_skips_finished_series(raw, converted):
    out, first = converted
    again = luna16.main(["--root", str(raw), "--out", str(out), "--workers", "1"])
    assert again["resumed"] == 3 and again["converted"] == 0
    assert again["samples"] == first["samples"]
