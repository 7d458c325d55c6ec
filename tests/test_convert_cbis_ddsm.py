"""CBIS-DDSM converter on tiny synthetic mammograms in the three real download layouts (DATA.md §2, §7).

Full images are 300 x 220 and the window is ``--crop-size 128``, so every rule (centred window,
padding at the edge, enlarged window for a large lesion, union of lesions in view, mask resized to
the image grid) is exercised in milliseconds; expected masks are computed here independently.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from freqmedclip.data.converters import cbis_ddsm
from freqmedclip.data.format import read_manifest

H, W = 300, 220
CROP, SIZE = 128, 224
MASS_HEADER = ("patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,"
               "mass shape,mass margins,assessment,pathology,subtlety,image file path,cropped image file path,"
               "ROI mask file path")
CALC_HEADER = ("patient_id,breast density,left or right breast,image view,abnormality id,abnormality type,"
               "calc type,calc distribution,assessment,pathology,subtlety,image file path,"
               "cropped image file path,ROI mask file path")


def rect(r0, r1, c0, c1, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


# name -> (category, official split, patient, abnormalities [(bbox, swapped file order)], options)
IMAGES = {
    "Mass-Training_P_00001_LEFT_CC": ("mass", "train", "P_00001",
                                      [((100, 140, 60, 90), False), ((5, 25, 190, 215), True),
                                       ((150, 160, 100, 120), False)], {"spacing": (0.1, 0.1)}),
    "Calc-Training_P_00001_LEFT_CC": ("calc", "train", "P_00001", [((120, 150, 40, 70), False)], {}),
    "Calc-Test_P_00002_RIGHT_MLO": ("calc", "test", "P_00002", [((60, 220, 30, 170), False)],
                                    {"monochrome1": True}),
    "Mass-Training_P_00003_LEFT_MLO": ("mass", "train", "P_00003", [((40, 60, 30, 50), False)],
                                       {"mask_shape": (150, 110)}),
    "Mass-Training_P_00004_LEFT_CC": ("mass", "train", "P_00004", [((40, 60, 30, 50), False)],
                                      {"mask_shape": (300, 200)}),
    "Mass-Training_P_00005_RIGHT_CC": ("mass", "train", "P_00005", [((40, 60, 30, 50), False)],
                                       {"truncate": True}),
    "Mass-Training_P_00006_RIGHT_CC": ("mass", "train", "P_00006", [((40, 60, 30, 50), False)],
                                       {"absent": True}),
}
GOOD = ["Mass-Training_P_00001_LEFT_CC", "Calc-Training_P_00001_LEFT_CC", "Calc-Test_P_00002_RIGHT_MLO",
        "Mass-Training_P_00003_LEFT_MLO"]


def abnormality_mask(name: str, i: int) -> np.ndarray:
    """Ground-truth mask of abnormality i on the full-image grid (as the converter should see it)."""
    (r0, r1, c0, c1), _ = IMAGES[name][3][i]
    shape = IMAGES[name][4].get("mask_shape")
    if shape is None or shape[0] / shape[1] != H / W:
        return rect(r0, r1, c0, c1)
    small = rect(r0, r1, c0, c1, shape)         # drawn on the smaller grid, upsampled by the converter
    rows = np.floor((np.arange(H) + 0.5) * shape[0] / H).astype(int)
    cols = np.floor((np.arange(W) + 0.5) * shape[1] / W).astype(int)
    return small[np.ix_(rows, cols)]


def full_image(name: str) -> np.ndarray:
    rng = np.random.default_rng(len(name))
    img = 2000 + 3000 * rng.random((H, W))
    for i in range(len(IMAGES[name][3])):
        img[abnormality_mask(name, i)] += 20000
    return img.astype(np.uint16)


def stored_full(name: str) -> np.ndarray:
    """Pixel data as written to DICOM: inverted for the MONOCHROME1 image (lesion bright once displayed)."""
    full = full_image(name)
    return (65535 - full).astype(np.uint16) if IMAGES[name][4].get("monochrome1") else full


def uids(name: str, i: int | None = None) -> tuple[str, str]:
    """Deterministic (study, series) UIDs of the full image (i None) or of abnormality i's ROI series."""
    n = sum(map(ord, name)) * 10 + (0 if i is None else i + 1)
    return f"1.3.6.1.4.1.9590.100.1.2.{n}1", f"1.3.6.1.4.1.9590.100.1.2.{n}2"


def write_dicom(path: Path, array: np.ndarray, patient: str, study: str, series: str, description: str,
                spacing=None, monochrome1: bool = False) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.SeriesDescription = patient, "MG", description
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    bits = 8 if array.dtype == np.uint8 else 16
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if spacing:
        ds.PixelSpacing = list(spacing)
    ds.PixelData = array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def crop_image(full: np.ndarray, bbox) -> np.ndarray:
    r0, r1, c0, c1 = bbox
    return full[max(r0 - 10, 0):r1 + 10, max(c0 - 10, 0):c1 + 10].copy()


def roi_mask(name: str, i: int) -> np.ndarray:
    (r0, r1, c0, c1), _ = IMAGES[name][3][i]
    shape = IMAGES[name][4].get("mask_shape", (H, W))
    return (rect(r0, r1, c0, c1, shape) * 255).astype(np.uint8)


def csv_rows(name: str) -> list[list[str]]:
    category, _, patient, abns, _ = IMAGES[name]
    study, series = uids(name)
    rows = []
    for i in range(len(abns)):
        rstudy, rseries = uids(name, i)
        roi_dir = f"{name}_{i + 1}/{rstudy}/{rseries}"
        crop_file, mask_file = "000000.dcm", "000001.dcm"    # what the CSV claims, even where disk differs
        descriptors = ["IRREGULAR", "SPICULATED"] if category == "mass" else ["PLEOMORPHIC", "CLUSTERED"]
        rows.append([patient, "3", name.split("_")[-2], name.split("_")[-1], str(i + 1),
                     "mass" if category == "mass" else "calcification", *descriptors, "4",
                     "MALIGNANT" if i == 0 else "BENIGN_WITHOUT_CALLBACK", "4",
                     f"{name}/{study}/{series}/000000.dcm", f"{roi_dir}/{crop_file}",
                     f"{roi_dir}/{mask_file}\n"])   # a quoted trailing newline, as in the real CSVs
    return rows


def write_csvs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for category in ("mass", "calc"):
        for split in ("train", "test"):
            with open(folder / f"{category}_case_description_{split}_set.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow((MASS_HEADER if category == "mass" else CALC_HEADER).split(","))
                for name, (cat, official, *_rest) in IMAGES.items():
                    if cat == category and official == split:
                        writer.writerows(csv_rows(name))


def roi_files(name: str, i: int) -> list[tuple[str, np.ndarray]]:
    """[(description, pixels)] of abnormality i's ROI series: cropped image first, mask second."""
    bbox = IMAGES[name][3][i][0]
    return [("cropped images", crop_image(full_image(name), bbox)), ("ROI mask images", roi_mask(name, i))]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_classic(root: Path) -> None:
    write_csvs(root)
    for name, (_, _, _, abns, opts) in IMAGES.items():
        if opts.get("absent"):
            continue
        study, series = uids(name)
        full_path = root / "CBIS-DDSM" / name / study / series / "000000.dcm"
        write_dicom(full_path, stored_full(name), name, study, series, "full mammogram images",
                    opts.get("spacing"), opts.get("monochrome1", False))
        if opts.get("truncate"):
            truncate(full_path)
        for i, (_, swapped) in enumerate(abns):
            rstudy, rseries = uids(name, i)
            files = roi_files(name, i)
            for j, (desc, pixels) in enumerate(files[::-1] if swapped else files):
                write_dicom(root / "CBIS-DDSM" / f"{name}_{i + 1}" / rstudy / rseries / f"00000{j}.dcm", pixels,
                            f"{name}_{i + 1}", rstudy, rseries, desc)


def write_descriptive(root: Path, metadata: bool = True) -> None:
    write_csvs(root)
    rows = []
    for n, (name, (_, _, _, abns, opts)) in enumerate(IMAGES.items()):
        if opts.get("absent"):
            continue
        study, series = uids(name)
        rel = f"CBIS-DDSM/{name}/07-20-2016-DDSM-NA-{7000 + n}/1.000000-full mammogram images-{24500 + n}"
        write_dicom(root / rel / "1-1.dcm", stored_full(name), name, study, series, "full mammogram images",
                    opts.get("spacing"), opts.get("monochrome1", False))
        if opts.get("truncate"):
            truncate(root / rel / "1-1.dcm")
        rows.append([series, f"./{rel}"])
        for i, (_, swapped) in enumerate(abns):
            rstudy, rseries = uids(name, i)
            rel = f"CBIS-DDSM/{name}_{i + 1}/08-29-2017-DDSM-NA-{8000 + n}/1.000000-ROI mask images-{30000 + n}"
            files = roi_files(name, i)
            order = files if swapped else files[::-1]       # normally 1-1 = mask, 1-2 = crop
            for j, (desc, pixels) in enumerate(order):
                write_dicom(root / rel / f"1-{j + 1}.dcm", pixels, f"{name}_{i + 1}", rstudy, rseries, desc)
            rows.append([rseries, f"./{rel}"])
    if metadata:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Series UID", "Collection", "3rd Party Analysis", "Data Description URI",
                             "Subject ID", "Study UID", "Study Description", "Study Date", "Series Description",
                             "Manufacturer", "Modality", "SOP Class Name", "SOP Class UID", "Number of Images",
                             "File Size", "File Location", "Download Timestamp"])
            for uid, loc in rows:
                writer.writerow([uid, "CBIS-DDSM", "NO", "", "", "", "", "", "", "", "MG", "", "", "1", "", loc, ""])


def write_kaggle(root: Path) -> None:
    write_csvs(root / "csv")
    info = []
    for name, (_, _, _, abns, opts) in IMAGES.items():
        if opts.get("absent"):
            continue
        study, series = uids(name)
        full = full_image(name).astype(np.float64)            # JPEGs are display-ready
        full8 = np.rint((full - full.min()) / (full.max() - full.min()) * 255).astype(np.uint8)
        path = root / "jpeg" / series / "1-1.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(full8).save(path, quality=90)
        if opts.get("truncate"):
            truncate(path)
        info.append([f"CBIS-DDSM/jpeg/{series}/1-1.jpg", name, series, "full mammogram images"])
        for i, (_, swapped) in enumerate(abns):
            _, rseries = uids(name, i)
            files = roi_files(name, i)
            for j, (_, pixels) in enumerate(files[::-1] if swapped else files):
                desc = ("cropped images", "ROI mask images")[j]      # by position, wrong where swapped
                if pixels.dtype != np.uint8:
                    pixels = np.rint(pixels / pixels.max() * 255).astype(np.uint8)
                path = root / "jpeg" / rseries / f"{j + 1}-1.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path, quality=75)     # lossy mask, as in the Kaggle copy
                info.append([f"CBIS-DDSM/jpeg/{rseries}/{j + 1}-1.jpg", f"{name}_{i + 1}", rseries,
                             "" if (name, i) == (GOOD[0], 0) and j == 1 else desc])
    with open(root / "csv" / "dicom_info.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_path", "image_path", "PatientID", "SeriesInstanceUID", "SeriesDescription"])
        for image_path, patient, series, desc in info:
            writer.writerow([image_path.replace("jpeg", "dicom").replace(".jpg", ".dcm"), image_path, patient,
                             series, desc])


def run(root: Path, out: Path, *extra: str) -> dict:
    return cbis_ddsm.main(["--root", str(root), "--out", str(out), "--workers", "1", "--crop-size", str(CROP),
                           *extra])


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbis_classic")
    write_classic(root)
    out = tmp_path_factory.mktemp("cbis_classic_out")
    return out, run(root, out, "--workers", "2")


def expected_target(name: str, i: int) -> tuple[np.ndarray, int]:
    """Stored mask of abnormality i's sample (union of the image's lesions in its window) and the window side."""
    union = np.logical_or.reduce([abnormality_mask(name, j) for j in range(len(IMAGES[name][3]))])
    own = abnormality_mask(name, i)
    rows, cols = np.flatnonzero(own.any(1)), np.flatnonzero(own.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(CROP, math.ceil(1.1 * max(r1 - r0, c1 - c0)))
    top, left = (r0 + r1 - side) // 2, (c0 + c1 - side) // 2
    padded = np.zeros((H + 2 * side, W + 2 * side), bool)
    padded[side:side + H, side:side + W] = union
    window = padded[side + top:side + top + side, side + left:side + left + side]
    idx = [int(np.floor((k + 0.5) * side / SIZE)) for k in range(SIZE)]
    return window[np.ix_(idx, idx)], side


def stored(out: Path, rel: str | None) -> np.ndarray | None:
    return None if rel is None else np.asarray(Image.open(out / rel))


def test_good_cases_convert_and_bad_ones_are_reported(classic):
    out, summary = classic
    assert summary["converted"] == len(GOOD)
    reasons = {s["case"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"Mass-Training_P_00004_LEFT_CC", "Mass-Training_P_00005_RIGHT_CC",
                            "Mass-Training_P_00006_RIGHT_CC"}
    assert "shape" in reasons["Mass-Training_P_00004_LEFT_CC"] and "000001.dcm" in reasons[
        "Mass-Training_P_00004_LEFT_CC"]
    assert "Mass-Training_P_00005_RIGHT_CC" in reasons["Mass-Training_P_00005_RIGHT_CC"] and ".dcm" in reasons[
        "Mass-Training_P_00005_RIGHT_CC"]
    assert "not found" in reasons["Mass-Training_P_00006_RIGHT_CC"]
    notes = " ".join(summary["notes"])
    assert "swapped" in notes and "resized" in notes and "assumed 0.05 mm" in notes


def test_windows_masks_and_spacing_are_exact(classic):
    out, _ = classic
    records = {r.sample_id: r for r in read_manifest(out)}
    assert len(records) == sum(len(IMAGES[n][3]) for n in GOOD)
    for name in GOOD:
        for i in range(len(IMAGES[name][3])):
            r = records[f"cbis_{name}_{i + 1}"]
            want, side = expected_target(name, i)
            assert np.array_equal(stored(out, r.mask) > 127, want), r.sample_id
            assert r.original_size == (side, side) and r.modality == "MG"
            spacing = IMAGES[name][4].get("spacing", (0.05, 0.05))[0]
            assert r.spacing_mm == pytest.approx((spacing * side / SIZE,) * 2)
            assert r.structure == ("mass" if name.startswith("Mass") else "calcification")
            assert r.prompts[0] in ("breast mass", "breast calcification") and len(r.prompts) >= 4
            image = stored(out, r.image)
            assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8
            lesion = want
            assert image[lesion].mean() > image[~lesion].mean() + 50, r.sample_id   # MONOCHROME1 inverted
    edge = records["cbis_Mass-Training_P_00001_LEFT_CC_2"]
    assert stored(out, edge.image)[:40].max() == 0                               # padding above the image
    assert records["cbis_Calc-Test_P_00002_RIGHT_MLO_1"].original_size == (176, 176)   # enlarged window
    union = records["cbis_Mass-Training_P_00001_LEFT_CC_1"]
    assert "2 annotated lesions" in union.caption and "spiculated" in " ".join(union.prompts)


def test_split_groups_patients_across_mass_and_calc(classic):
    out, _ = classic
    split_of = {}
    for r in read_manifest(out):
        assert split_of.setdefault(r.subject_id, r.split) == r.split
    assert set(split_of) == {"P_00001", "P_00002", "P_00003"}


def test_descriptive_layout_with_and_without_metadata_matches_classic(classic, tmp_path):
    ref_out, _ = classic
    ref = {r.sample_id: r for r in read_manifest(ref_out)}
    for metadata in (True, False):
        root, out = tmp_path / f"desc{metadata}", tmp_path / f"out{metadata}"
        write_descriptive(root, metadata)
        summary = run(root, out)
        assert summary["converted"] == len(GOOD), summary["skipped"]
        for r in read_manifest(out):
            assert np.array_equal(stored(out, r.image), stored(ref_out, ref[r.sample_id].image)), r.sample_id
            assert np.array_equal(stored(out, r.mask), stored(ref_out, ref[r.sample_id].mask)), r.sample_id


def test_kaggle_jpeg_layout_gives_the_same_masks(classic, tmp_path):
    ref_out, _ = classic
    ref = {r.sample_id: r for r in read_manifest(ref_out)}
    write_kaggle(tmp_path / "kaggle")
    summary = run(tmp_path / "kaggle", tmp_path / "out")
    assert summary["converted"] == len(GOOD), summary["skipped"]
    assert "dicom_info.csv SeriesDescription" in " ".join(summary["notes"])
    records = read_manifest(tmp_path / "out")
    assert len(records) == len(ref)
    for r in records:
        assert np.array_equal(stored(tmp_path / "out", r.mask), stored(ref_out, ref[r.sample_id].mask)), r.sample_id
        assert r.spacing_mm == pytest.approx((0.05 * r.original_size[0] / SIZE,) * 2)


def test_official_split_and_rerun(tmp_path):
    root = tmp_path / "raw"
    write_classic(root)
    first = run(root, tmp_path / "out", "--split", "official")
    split_of = {r.subject_id: r.split for r in read_manifest(tmp_path / "out")}
    assert split_of["P_00002"] == "test" and split_of["P_00001"] != "test" and split_of["P_00003"] != "test"
    again = run(root, tmp_path / "out", "--split", "official")
    assert again["resumed"] == first["converted"] and again["converted"] == 0
    assert len(again["skipped"]) == 3                      # bad cases are retried and reported again
