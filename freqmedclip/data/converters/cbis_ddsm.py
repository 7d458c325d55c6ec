"""CBIS-DDSM mammography -> 2D lesion crops in the FreqMedCLIP format (paper §4; DATA.md §2, §8).

Inputs (``--root`` is searched recursively):

- The four TCIA description CSVs ``{mass,calc}_case_description_{train,test}_set.csv``; one row is one
  abnormality. Column names are normalised (``breast_density`` in the mass CSVs is ``breast density``
  in the calc CSVs) and path cells are stripped (some carry a quoted trailing newline). A path cell is
  ``<PatientID>/<StudyUID>/<SeriesUID>/<file>``; rows are matched to files by the SeriesInstanceUID.
- Images in any of the three download layouts:
  * NBIA classic: ``<PatientID>/<StudyUID>/<SeriesUID>/00000x.dcm`` (the CSV paths);
  * NBIA descriptive: ``CBIS-DDSM/<PatientID>/<date>-DDSM-NA-<n>/1.000000-<description>-<n>/1-x.dcm``
    with ``metadata.csv`` (``Series UID`` -> ``File Location``); without metadata.csv the
    SeriesInstanceUID is read from the DICOM headers;
  * Kaggle JPEG (awsaf49): ``csv/dicom_info.csv`` (``image_path`` = ``CBIS-DDSM/jpeg/<SeriesUID>/<n>-<m>.jpg``)
    and ``jpeg/<SeriesUID>/*.jpg``.

Which file of an ROI series is the mask and which the cropped image is decided by content, never by
file name, order or SeriesDescription (all are wrong or missing for some cases): the ROI mask is the
near-binary image (>= 99 % of pixels within 10 % of the darkest or brightest value, tolerating JPEG
noise); if several qualify, the one whose size is closest to the full mammogram. The mask is
binarised at the midpoint of its range (> 127 for 8-bit). A mask whose size differs from the full
image is resized to it by nearest neighbour when the aspect ratios agree within 2 % (a known CBIS
quirk, noted in the summary); otherwise the case is skipped.

One sample per abnormality row (one case = one full mammogram, all its rows):

1. Window: square, centred on the centre of the abnormality's mask bounding box (half-open bbox
   rows [r0, r1): top = (r0 + r1 - side) // 2, same for columns); side = ``--crop-size`` (512), enlarged
   to ceil(1.1 x the lesion's longer side) when the lesion does not fit, so a large lesion is fully
   inside with a margin (it is then shrunk more by the resize). Parts outside the mammogram are padded
   (image: its minimum, i.e. black after normalisation; mask: 0).
2. Target: union of the masks of all abnormalities of this mammogram (same type) inside the window,
   so another lesion in view is not labelled background. Structure = ``mass`` or ``calcification``.
3. Intensity: clip to the [0.5, 99.5] percentiles of the window's real pixels (``--clip-percentiles``;
   ``0 100`` = plain min-max), min-max to [0, 255]; MONOCHROME1 images are inverted first.
4. Resize side -> ``--size`` (224): bilinear image, nearest mask. Spacing from DICOM PixelSpacing or
   ImagerPixelSpacing, else ``--assumed-spacing`` (0.05 mm: DDSM films were digitised at ~42-50 um;
   JPEGs never carry it); stored spacing = spacing x side / 224 (0.114 mm for 512 at 0.05 mm).

Splits are by patient (``P_xxxxx``, shared by mass/calc and official train/test rows), stratified by
abnormality type x pathology (benign includes BENIGN_WITHOUT_CALLBACK). ``--split official`` puts every
patient with a row in a test CSV into test and splits the rest into train/val.
The paper reports 3,400 / 800 / 400 crops; the CSVs hold 3,568 abnormality rows, so one crop per row
cannot reproduce those counts exactly.

Usage::

    python -m freqmedclip.data.converters.cbis_ddsm --root CBIS-DDSM --out data/cbis --workers 4
"""

from __future__ import annotations

import csv
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from PIL import Image

from freqmedclip.data.converters.runner import (
    Case,
    CaseError,
    base_parser,
    parse_converter_args,
    relative,
    resize_bilinear,
    resize_nearest,
    run_conversion,
    safe_name,
    stored_spacing,
    to_uint8,
)
from freqmedclip.data.format import StructureRecord, assign_splits, write_sample

VERSION = "cbis-1"
UID = re.compile(r"^\d+(\.\d+)+$")
IMAGE_SUFFIXES = {".dcm", ".jpg", ".jpeg", ".png"}
DESCRIPTION_CSV = re.compile(r"(mass|calc)_case_description_(train|test)_set\.csv$", re.IGNORECASE)
STRUCTURE = {"mass": "mass", "calcification": "calcification", "calc": "calcification"}
PROMPTS = {
    "mass": ["breast mass", "mass", "mass lesion in the mammogram", "breast lesion"],
    "calcification": [
        "breast calcification",
        "calcifications",
        "microcalcifications in the mammogram",
        "calcified breast lesion",
    ],
}


@dataclass(frozen=True)
class CbisOptions:
    dataset: str = "breast"
    size: int = 224
    crop_size: int = 512
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    assumed_spacing: float = 0.05


# ---------------------------------------------------------------------------------------------
# indexing the download
# ---------------------------------------------------------------------------------------------


def read_descriptions(root: Path) -> list[dict[str, str]]:
    """Every row of the description CSVs under ``root``, with normalised column names.

    Extra keys: ``_csv`` (path relative to root), ``_line``, ``_official`` ("train" | "test"),
    ``_category`` ("mass" | "calc").
    """
    rows = []
    for path in sorted(Path(root).rglob("*.csv")):
        m = DESCRIPTION_CSV.search(path.name)
        if m is None:
            continue
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for line, raw in enumerate(reader, start=2):
                row = {(k or "").strip().lower().replace(" ", "_"): (v or "").strip() for k, v in raw.items()}
                row.update(_csv=relative(path, root), _line=str(line), _official=m[2].lower(), _category=m[1].lower())
                rows.append(row)
    return rows


def split_path(cell: str) -> tuple[str, str, str]:
    """(first component = NBIA PatientID, SeriesInstanceUID, file name) of a CSV path cell."""
    parts = [p for p in cell.replace("\\", "/").strip().split("/") if p]
    if len(parts) < 2:
        return (parts[0] if parts else "", "", parts[-1] if parts else "")
    return parts[0], parts[-2], parts[-1]


def _image_files(folder: Path) -> list[str]:
    try:
        return sorted(
            os.path.normpath(folder / f)
            for f in os.listdir(folder)
            if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith(".")
        )
    except OSError:
        return []


def index_series(root: Path, needed: set[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Map SeriesInstanceUID -> image files, for all three layouts.

    Sources, in order: NBIA ``metadata.csv`` (Series UID -> File Location), Kaggle ``dicom_info.csv``
    (SeriesInstanceUID -> image_path), folders named by a UID (classic layout, Kaggle ``jpeg/``), and
    finally the headers of not yet indexed DICOM files when a needed UID is still missing.

    Returns:
        ({uid: [absolute file paths]}, {file path: SeriesDescription from dicom_info.csv}).
    """
    root = Path(root)
    index: dict[str, set[str]] = defaultdict(set)
    descriptions: dict[str, str] = {}
    for meta in sorted(root.rglob("metadata.csv")):
        with open(meta, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                uid, loc = (row.get("Series UID") or "").strip(), (row.get("File Location") or "").strip()
                if uid and loc:
                    for base in (meta.parent, root):
                        files = _image_files(base / loc.replace("\\", "/"))
                        if files:
                            index[uid].update(files)
                            break
    for info in sorted(root.rglob("dicom_info.csv")):
        kaggle_root = info.parent.parent
        with open(info, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                uid, rel = (row.get("SeriesInstanceUID") or "").strip(), (row.get("image_path") or "").strip()
                if not uid or not rel:
                    continue
                rel = re.sub(r"^CBIS-DDSM/", "", rel.replace("\\", "/"))
                for base in (kaggle_root, info.parent, root):
                    if (base / rel).is_file():
                        path = os.path.normpath(base / rel)
                        index[uid].add(path)
                        descriptions[path] = (row.get("SeriesDescription") or "").strip()
                        break
    unindexed_dicoms = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files = [f for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith(".")]
        if not files:
            continue
        paths = [os.path.normpath(os.path.join(dirpath, f)) for f in files]
        name = os.path.basename(dirpath)
        if UID.match(name):
            index[name].update(paths)
        else:
            unindexed_dicoms += [p for p in paths if p.lower().endswith(".dcm")]
    indexed = {p for files in index.values() for p in files}
    if needed - set(index):
        for path in unindexed_dicoms:
            if path in indexed:
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                index[str(ds.SeriesInstanceUID)].add(path)
            except Exception:  # an unreadable file cannot be matched; its case is reported as not found
                continue
    return {uid: sorted(files) for uid, files in index.items()}, descriptions


def find_cases(root: Path) -> tuple[list[Case], list[tuple[str, str]], dict[str, str], set[str]]:
    """Group description rows into one case per full mammogram and resolve their files.

    Returns:
        (cases, skipped (case, reason), {sample_id: split stratum}, patients with an official test row).
    """
    root = Path(root)
    rows = read_descriptions(root)
    skipped: list[tuple[str, str]] = []
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        image_cell = row.get("image_file_path", "")
        if not row.get("patient_id") or not image_cell or not row.get("roi_mask_file_path"):
            skipped.append((f"{row['_csv']}:{row['_line']}", "row without patient_id, image or ROI mask path"))
            continue
        groups[split_path(image_cell)[0] or row["patient_id"]].append(row)
    needed = set()
    for group in groups.values():
        for row in group:
            needed |= {
                split_path(row[c])[1]
                for c in ("image_file_path", "roi_mask_file_path", "cropped_image_file_path")
                if row.get(c)
            }
    index, descriptions = index_series(root, needed)

    cases: list[Case] = []
    strata: dict[str, str] = {}
    test_patients: set[str] = set()
    for key, group in sorted(groups.items()):
        full_uid = split_path(group[0]["image_file_path"])[1]
        full_files = index.get(full_uid, [])
        where = f"{group[0]['_csv']}:{group[0]['_line']}"
        if not full_files:
            skipped.append((key, f"full mammogram series {full_uid} ({where}) not found under {root}"))
            continue
        abnormalities, problem, seen = [], "", defaultdict(int)
        for row in group:
            roi = split_path(row["roi_mask_file_path"])
            crop = split_path(row.get("cropped_image_file_path", ""))
            candidates = sorted((set(index.get(roi[1], [])) | set(index.get(crop[1], []))) - set(full_files))
            if not candidates:
                problem = (
                    f"ROI mask series {roi[1]} ({row['_csv']}:{row['_line']}, abnormality "
                    f"{row.get('abnormality_id', '?')}) not found under {root}"
                )
                break
            abn_id = safe_name(row.get("abnormality_id", "") or "1")
            seen[abn_id] += 1
            sample_id = f"cbis_{safe_name(key)}_{abn_id}" + (f"_{seen[abn_id]}" if seen[abn_id] > 1 else "")
            structure = STRUCTURE.get(row.get("abnormality_type", "").lower(), STRUCTURE[row["_category"]])
            pathology = "malignant" if row.get("pathology", "").upper().startswith("MALIGNANT") else "benign"
            strata[sample_id] = f"{structure}/{pathology}"
            abnormalities.append(
                {
                    "row": row,
                    "sample_id": sample_id,
                    "structure": structure,
                    "candidates": candidates,
                    "csv_mask_name": roi[2],
                    "descriptions": {p: descriptions.get(p, "") for p in candidates},
                }
            )
            if row["_official"] == "test":
                test_patients.add(row["patient_id"])
        if problem:
            skipped.append((key, problem))
            continue
        payload = {"full_files": full_files, "abnormalities": abnormalities, "root": str(root)}
        cases.append(Case(key=key, source=relative(full_files[0], root), payload=payload))
    return cases, skipped, strata, test_patients


# ---------------------------------------------------------------------------------------------
# one mammogram
# ---------------------------------------------------------------------------------------------


def read_image(path: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Read a DICOM or JPEG/PNG image.

    Returns:
        (float32 (H, W), bright = dense tissue; (row, col) pixel spacing in mm or None).
    Raises:
        CaseError naming the file if it cannot be decoded.
    """
    try:
        if path.lower().endswith(".dcm"):
            ds = pydicom.dcmread(path)
            array = ds.pixel_array.astype(np.float32)
            if array.ndim != 2:
                raise CaseError(f"{path}: expected one 2D frame, got pixel array of shape {array.shape}")
            if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
                array = array.max() - array
            spacing = None
            for tag in ("PixelSpacing", "ImagerPixelSpacing"):
                value = ds.get(tag)
                if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
                    spacing = (float(value[0]), float(value[1]))
                    break
            return array, spacing
        with Image.open(path) as im:
            im.load()
            array = np.asarray(im if im.mode in ("L", "I", "I;16", "F") else im.convert("L"), dtype=np.float32)
        return array, None
    except CaseError:
        raise
    except Exception as e:  # pydicom / PIL raise many types for corrupt or truncated files
        raise CaseError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def looks_like_mask(array: np.ndarray) -> bool:
    """True for a (near-)binary image: >= 99 % of pixels within 10 % of the range from either extreme."""
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return False
    t = (array - lo) / (hi - lo)
    bright = t >= 0.9
    return bool(((t <= 0.1) | bright).mean() >= 0.99 and bright.any())


def crop_window(bbox: tuple[int, int, int, int], crop_size: int) -> tuple[int, int, int]:
    """(top, left, side) of the square window for a half-open bbox (r0, r1, c0, c1)."""
    r0, r1, c0, c1 = bbox
    side = max(crop_size, math.ceil(1.1 * max(r1 - r0, c1 - c0)))
    return (r0 + r1 - side) // 2, (c0 + c1 - side) // 2, side


def extract(array: np.ndarray, top: int, left: int, side: int, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """(side, side) window of ``array`` starting at (top, left), padded with ``fill``; plus its valid mask."""
    h, w = array.shape
    window = np.full((side, side), fill, dtype=array.dtype)
    valid = np.zeros((side, side), dtype=bool)
    r0, r1 = max(top, 0), min(top + side, h)
    c0, c1 = max(left, 0), min(left + side, w)
    if r0 < r1 and c0 < c1:
        window[r0 - top : r1 - top, c0 - left : c1 - left] = array[r0:r1, c0:c1]
        valid[r0 - top : r1 - top, c0 - left : c1 - left] = True
    return window, valid


def normalise(window: np.ndarray, valid: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Percentile clip + min-max over the valid pixels to [0, 255] float; padding -> 0."""
    values = window[valid]
    if values.size == 0:
        return np.zeros(window.shape, np.float32)
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(window.shape, np.float32)
    scaled = np.clip((window - lo) / (hi - lo), 0, 1) * 255
    return np.where(valid, scaled, 0).astype(np.float32)


def _words(text: str) -> str:
    """CSV descriptor -> lower-case words ("" for N/A): 'SPICULATED-ILL_DEFINED' -> 'spiculated ill defined'."""
    text = (text or "").strip()
    if text.upper() in {"", "N/A", "NA", "NAN", "NONE"}:
        return ""
    return re.sub(r"[_\-\s]+", " ", text).lower().strip()


def prompts_for(structure: str, row: dict[str, str]) -> list[str]:
    """Generic phrasings first (prompts[0] is the fixed eval prompt), then ones built from the descriptors."""
    pathology = "malignant" if row.get("pathology", "").upper().startswith("MALIGNANT") else "benign"
    prompts = list(PROMPTS[structure])
    if structure == "mass":
        shape, margins = _words(row.get("mass_shape", "")), _words(row.get("mass_margins", ""))
        described = " ".join(w for w in (shape, "mass") if w)
        if margins:
            described += f" with {margins} margins"
        prompts += [f"{pathology} breast mass", described]
    else:
        kind, distribution = _words(row.get("calc_type", "")), _words(row.get("calc_distribution", ""))
        prompts += [f"{pathology} calcifications", " ".join(w for w in (distribution, kind, "calcifications") if w)]
    return list(dict.fromkeys(p for p in prompts if p))


def caption_for(structure: str, row: dict[str, str], n_lesions: int) -> str:
    """Image-level caption from the CSV row: view, pathology, descriptors, BI-RADS, density, lesions in view."""
    side = row.get("left_or_right_breast", "").lower()
    view = row.get("image_view", "").upper()
    what = prompts_for(structure, row)[-1]
    pathology = "malignant" if row.get("pathology", "").upper().startswith("MALIGNANT") else "benign"
    extra = f", {n_lesions} annotated lesions in view" if n_lesions > 1 else ""
    return (
        f"mammogram crop ({side} {view}): {pathology} {what}, BI-RADS {row.get('assessment', '?')}"
        f", breast density {row.get('breast_density', '?')}{extra}"
    ).replace("  ", " ")


def convert_case(case: Case, out: Path, opt: CbisOptions) -> tuple[list[StructureRecord], list[str]]:
    """Convert one full mammogram (all its abnormality rows); returns (records, notes)."""
    p = case.payload
    root = p["root"]
    notes: list[str] = []
    full, full_spacing, full_path = None, None, ""
    for path in p["full_files"]:
        array, spacing = read_image(path)
        if full is None or array.size > full.size:
            full, full_spacing, full_path = array, spacing, path
    if looks_like_mask(full):
        raise CaseError(f"{full_path}: the full mammogram looks like a binary mask")
    if full_spacing is None:
        full_spacing = (opt.assumed_spacing, opt.assumed_spacing)
        notes.append(f"no PixelSpacing/ImagerPixelSpacing: assumed {opt.assumed_spacing} mm")

    masks: list[np.ndarray] = []
    sources: list[str] = []
    for abn in p["abnormalities"]:
        found = []
        for path in abn["candidates"]:
            array, _ = read_image(path)
            if looks_like_mask(array):
                found.append((path, array))
        if not found:
            raise CaseError(
                f"no binary ROI mask among {[relative(c, root) for c in abn['candidates']]} "
                f"(abnormality {abn['sample_id']})"
            )
        path, mask = min(
            found,
            key=lambda pa: (
                abs(math.log(pa[1].shape[0] / full.shape[0])) + abs(math.log(pa[1].shape[1] / full.shape[1]))
            ),
        )
        if os.path.basename(path) != abn["csv_mask_name"] and any(
            os.path.basename(c) == abn["csv_mask_name"] for c in abn["candidates"]
        ):
            notes.append("ROI mask and cropped image swapped relative to the CSV file names (decided by content)")
        desc = abn["descriptions"].get(path, "").lower()
        if desc and "mask" not in desc:
            notes.append(
                "dicom_info.csv SeriesDescription of the ROI mask is not 'ROI mask images' (decided by content)"
            )
        binary = mask > (float(mask.min()) + float(mask.max())) / 2
        if binary.shape != full.shape:
            aspect_mask, aspect_full = binary.shape[0] / binary.shape[1], full.shape[0] / full.shape[1]
            if abs(aspect_mask / aspect_full - 1) > 0.02:
                raise CaseError(
                    f"{path}: ROI mask shape {binary.shape} does not match the full mammogram {full_path} {full.shape}"
                )
            binary = resize_nearest(binary, full.shape)
            notes.append("ROI mask size differs from the full mammogram (same aspect): resized, nearest")
        if not binary.any():
            raise CaseError(f"{path}: ROI mask is empty")
        masks.append(binary)
        sources.append(relative(path, root))
    union = np.logical_or.reduce(masks)

    records = []
    fill = float(full.min())
    for abn, mask, mask_source in zip(p["abnormalities"], masks, sources):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        top, left, side = crop_window((rows[0], rows[-1] + 1, cols[0], cols[-1] + 1), opt.crop_size)
        window, valid = extract(full, top, left, side, fill)
        target, _ = extract(union, top, left, side, False)
        image = to_uint8(resize_bilinear(normalise(window, valid, opt.clip_percentiles), opt.size))
        target = resize_nearest(target, opt.size)
        structure = abn["structure"]
        rel_image, rel_masks = write_sample(
            out, abn["sample_id"], image, {structure: target} if target.any() else {}, overwrite=True
        )
        in_view = sum(int(extract(m, top, left, side, False)[0].any()) for m in masks)
        records.append(
            StructureRecord(
                sample_id=abn["sample_id"],
                subject_id=abn["row"]["patient_id"],
                dataset=opt.dataset,
                modality="MG",
                structure=structure,
                prompts=prompts_for(structure, abn["row"]),
                image=rel_image,
                mask=rel_masks.get(structure),
                spacing_mm=stored_spacing(full_spacing, (side, side), opt.size),
                original_size=(side, side),
                source=f"{relative(full_path, root)};{mask_source}#window={top},{left},{side}",
                caption=caption_for(structure, abn["row"], in_view),
            )
        )
    return records, notes


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the converter; returns the summary (see convert.run_conversion)."""
    parser = base_parser("freqmedclip.data.converters.cbis_ddsm", __doc__, "breast")
    parser.add_argument("--crop-size", type=int, default=512, help="window side in full-mammogram pixels")
    parser.add_argument("--clip-percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LO", "HI"))
    parser.add_argument(
        "--assumed-spacing",
        type=float,
        default=0.05,
        help="pixel spacing in mm when the file has none (JPEG; DICOM without PixelSpacing)",
    )
    parser.add_argument(
        "--split",
        choices=("patient", "official"),
        default="patient",
        help="patient: 70/20/10 by patient; official: official test patients -> test",
    )
    args = parse_converter_args(parser, argv)
    opt = CbisOptions(
        dataset=args.dataset_name,
        size=args.size,
        crop_size=args.crop_size,
        clip_percentiles=tuple(args.clip_percentiles),
        assumed_spacing=args.assumed_spacing,
    )
    cases, skipped, strata, test_patients = find_cases(args.root)
    if not cases and not skipped:
        parser.error(f"no *_case_description_*.csv with rows found under {args.root}")

    def stratify(r: StructureRecord) -> str:
        return f"{r.dataset}/{strata.get(r.sample_id, r.structure)}"

    def official(records: list[StructureRecord]) -> None:
        train, val = args.fractions[0], args.fractions[1]
        rest = [r for r in records if r.subject_id not in test_patients]
        if rest:
            assign_splits(rest, (train / (train + val), val / (train + val), 0.0), seed=args.seed, stratify_by=stratify)
        for r in records:
            if r.subject_id in test_patients:
                r.split = "test"

    return run_conversion(
        dataset=opt.dataset,
        out=args.out,
        cases=cases,
        convert=convert_case,
        options=opt,
        version=VERSION,
        workers=args.workers,
        seed=args.seed,
        fractions=args.fractions,
        stratify=stratify,
        assign=official if args.split == "official" else None,
        skipped=skipped,
        limit=args.limit,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
