"""BraTS glioma MRI -> 2D axial slices in the FreqMedCLIP format (paper §4; DATA.md §1, §8).

Layouts read (``--root`` is searched recursively, so the Kaggle tree, the CBICA tree or a folder of
case folders all work):

- BraTS 2020 (and 2017-2021 style names): ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii`` (Kaggle copy)
  or ``.nii.gz`` (CBICA). Labels {0, 1 NCR/NET, 2 oedema, 4 enhancing}.
- BraTS 2023+ ("2021+" GLI naming): ``BraTS-GLI-xxxxx-xxx-{t1n,t1c,t2w,t2f,seg}.nii.gz`` with the
  enhancing tumour relabelled 3 (t2f = FLAIR, t1c = T1ce, t1n = T1, t2w = T2).
- The Kaggle quirk of case 355: its folder holds ``W39_1998.09.19_Segm.nii`` instead of
  ``BraTS20_Training_355_seg.nii``. When a case has no ``_seg`` file and its folder holds exactly one
  other NIfTI, that file is used as the segmentation and a note is logged (the data is not renamed).
- ``name_mapping.csv`` (optional): its ``Grade`` (HGG/LGG) stratifies the subject-level split.

Per case (streamed: one case in memory per worker, about 300 MB at 240 x 240 x 155):

1. Every volume is reoriented to LPS with nibabel (never hard-coded), so an axial slice
   ``vol[:, :, k].T`` has rows anterior -> posterior and columns patient right -> left (radiological view).
2. Intensities: per volume and modality, z-score over the brain (the modality's nonzero voxels),
   z clipped to [-3, 3] (``--z-clip``) and mapped linearly to [0, 255]; background stays 0. Three of the
   four modalities become the RGB channels (``--channels``, default FLAIR, T1ce, T2), because the
   BiomedCLIP encoder takes 3 channels.
3. Slices: axial slices with brain on at least ``--min-brain-fraction`` of the slice are candidates.
   A slice with at least ``--min-tumour-pixels`` whole-tumour pixels is a tumour slice (all kept, or
   ``--max-tumour-slices`` evenly spaced ones); a brain slice without any tumour is a negative, of
   which ``--negatives-per-case`` are drawn (seeded per case); slices with a few tumour pixels only
   are dropped as neither clear positives nor true negatives.
   The paper reports 8,000 / 2,200 / 1,100 train/val/test slices (about 11,300 from 369 cases,
   ~31 per case) without stating its filter. The defaults keep every tumour slice (several dozen
   per case, depending on the tumour's extent); ``--max-tumour-slices 28 --negatives-per-case 3``
   gives at most 31 per case, close to the paper's total.
4. Resize 240 -> ``--size`` (224): bilinear for the image, nearest for the labels (see convert.py
   for the exact pixel mapping). Spacing = voxel size (1 mm) x 240 / 224 = 1.0714 mm.
5. Structures (one manifest record each, ``mask=None`` when absent from the stored slice):
   whole_tumour {NCR, ED, ET}, tumour_core {NCR, ET}, enhancing_tumour {ET}, necrotic_core {NCR},
   oedema {ED}; i.e. the BraTS evaluation regions plus the paper's three sub-regions.

Bad cases (missing modality or segmentation, unreadable or truncated NIfTI, shape mismatch between
files, label values outside the scheme) are skipped and listed in the summary.

Usage::

    python -m freqmedclip.data.converters.brats --root BraTS2020_TrainingData --out data/brats --workers 4
"""

from __future__ import annotations

import csv
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from freqmedclip.data.converters.runner import (
    Case,
    CaseError,
    base_parser,
    case_rng,
    parse_converter_args,
    relative,
    resize_bilinear,
    resize_nearest,
    run_conversion,
    safe_name,
    stored_spacing,
    to_uint8,
)
from freqmedclip.data.format import StructureRecord, write_sample

VERSION = "brats-1"
MODALITIES = ("flair", "t1", "t1ce", "t2")
# 2023+ GLI file suffixes -> the 2020 modality names used everywhere else.
GLI_MODALITIES = {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "seg": "seg"}
PATTERN_2020 = re.compile(r"^(?P<case>.+)_(?P<mod>flair|t1ce|t1|t2|seg)\.nii(\.gz)?$", re.IGNORECASE)
PATTERN_GLI = re.compile(r"^(?P<case>BraTS-[A-Za-z]+-\d+-\d+)-(?P<mod>t2f|t1n|t1c|t2w|seg)\.nii(\.gz)?$", re.IGNORECASE)
NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
GLI_TIMEPOINT = re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d+$")


def patient_id(case_key: str) -> str:
    """The subject a case belongs to: BraTS-GLI-00123-001 and -002 are two timepoints of one patient, so splits
    (which are made on subjects) must keep them together; 2020 case names are one case per patient."""
    match = GLI_TIMEPOINT.match(case_key)
    return match["patient"] if match else case_key

# label value of (necrotic core, oedema, enhancing tumour) per labelling scheme
LABELS = {"2020": (1, 2, 4), "2023": (1, 2, 3)}
STRUCTURES = ("whole_tumour", "tumour_core", "enhancing_tumour", "necrotic_core", "oedema")
# which of (NCR, ED, ET) each structure contains
STRUCTURE_PARTS = {
    "whole_tumour": (True, True, True),
    "tumour_core": (True, False, True),
    "enhancing_tumour": (False, False, True),
    "necrotic_core": (True, False, False),
    "oedema": (False, True, False),
}
PROMPTS = {
    "whole_tumour": [
        "whole tumour",
        "brain tumor",
        "glioma",
        "whole tumor including peritumoral edema",
        "glioma with surrounding oedema",
    ],
    "tumour_core": [
        "tumour core",
        "tumor core",
        "necrotic and enhancing tumour core",
        "core of the brain tumor",
        "glioma core without oedema",
    ],
    "enhancing_tumour": [
        "enhancing tumour",
        "enhancing tumor",
        "gadolinium-enhancing tumour",
        "contrast-enhancing rim of the glioma",
        "active tumor",
    ],
    "necrotic_core": [
        "necrotic core",
        "necrotic tumour core",
        "tumor necrosis",
        "necrotic and non-enhancing tumor core",
        "necrosis inside the glioma",
    ],
    "oedema": [
        "peritumoral oedema",
        "peritumoral edema",
        "brain oedema",
        "edema around the tumor",
        "FLAIR hyperintense oedema",
    ],
}
CHANNEL_NAMES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2"}


@dataclass(frozen=True)
class BratsOptions:
    dataset: str = "brain"
    size: int = 224
    channels: tuple[str, str, str] = ("flair", "t1ce", "t2")
    structures: tuple[str, ...] = STRUCTURES
    min_brain_fraction: float = 0.05
    min_tumour_pixels: int = 25
    max_tumour_slices: int = 0
    negatives_per_case: int = 2
    z_clip: float = 3.0
    labels: str = "auto"
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# indexing the download
# ---------------------------------------------------------------------------------------------


def find_cases(root: Path) -> tuple[list[Case], list[tuple[str, str]]]:
    """Find every case under ``root``.

    Returns:
        (cases, skipped (case, reason) pairs). A case's payload holds absolute paths of the
        four modalities and the segmentation, its labelling scheme and the source string.
    """
    root = Path(root)
    cases: list[Case] = []
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        niftis = sorted(f for f in filenames if NIFTI.search(f) and not f.startswith("."))
        if not niftis:
            continue
        groups: dict[str, dict[str, str]] = {}
        schemes: dict[str, str] = {}
        unknown: list[str] = []
        for name in niftis:
            m = PATTERN_GLI.match(name)
            scheme = "2023"
            if m is None:
                m, scheme = PATTERN_2020.match(name), "2020"
            if m is None:
                unknown.append(name)
                continue
            mod = m["mod"].lower()
            mod = GLI_MODALITIES[mod] if scheme == "2023" else mod
            groups.setdefault(m["case"], {})[mod] = os.path.join(dirpath, name)
            schemes[m["case"]] = scheme
        for case_id, files in sorted(groups.items()):
            where = relative(dirpath, root)
            missing = [m for m in MODALITIES if m not in files]
            if missing:
                skipped.append(
                    (
                        case_id,
                        f"missing modality {', '.join(missing)} in {where} "
                        f"(expected e.g. {case_id}_{missing[0]}.nii[.gz])",
                    )
                )
                continue
            seg_note = ""
            if "seg" not in files:
                if len(groups) == 1 and len(unknown) == 1:
                    files["seg"] = os.path.join(dirpath, unknown[0])
                    seg_note = f"segmentation read from mis-named file {unknown[0]} (known Kaggle quirk, case 355)"
                elif unknown:
                    skipped.append(
                        (case_id, f"no {case_id}_seg.nii[.gz] in {where} and several candidate files {unknown}")
                    )
                    continue
                else:
                    skipped.append(
                        (case_id, f"no segmentation {case_id}_seg.nii[.gz] in {where} (unlabelled validation case?)")
                    )
                    continue
            source = ";".join(relative(files[m], root) for m in (*MODALITIES, "seg"))
            payload = {"files": files, "scheme": schemes[case_id], "source": source, "seg_note": seg_note}
            cases.append(Case(key=case_id, source=relative(files["seg"], root), payload=payload))
    keys = [c.key for c in cases]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        cases = [c for c in cases if c.key not in duplicates]
        skipped += [(k, "the same case id occurs in several folders") for k in sorted(duplicates)]
    return cases, skipped


def read_grades(root: Path) -> dict[str, str]:
    """{BraTS 2020 subject id: 'HGG' | 'LGG'} from every name_mapping*.csv under ``root``."""
    grades: dict[str, str] = {}
    for path in sorted(Path(root).rglob("name_mapping*.csv")):
        with open(path, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                subject = row.get("BraTS_2020_subject_ID") or row.get("BraTS_2021_subject_ID", "")
                if subject and row.get("Grade"):
                    grades[subject] = row["Grade"]
    return grades


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------


def load_volume(path: str, dtype: type = np.float32) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI volume reoriented to LPS.

    Returns:
        (array (X, Y, Z) with X -> patient left, Y -> posterior, Z -> superior; voxel size in mm per axis).
    Raises:
        CaseError naming the file when it cannot be read or is not 3D.
    """
    try:
        img = nib.funcs.squeeze_image(nib.load(path))
        if img.ndim != 3:
            raise CaseError(f"{path}: expected a 3D volume, got shape {img.shape}")
        transform = ornt_transform(io_orientation(img.affine), axcodes2ornt(("L", "P", "S")))
        img = img.as_reoriented(transform)
        array = np.asarray(img.dataobj, dtype=dtype)
    except CaseError:
        raise
    except Exception as e:  # nibabel raises many types for corrupt or truncated files
        raise CaseError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from e
    zooms = tuple(float(z) for z in np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)))
    return array, zooms


def zscore_to_uint8_scale(volume: np.ndarray, z_clip: float, path: str) -> np.ndarray:
    """z-score over the nonzero voxels, clip to [-z_clip, z_clip], map to [0, 255]; background stays 0.

    Args:
        volume: (X, Y, Z) float32.
    Returns:
        float32 (X, Y, Z) in [0, 255] (rounded only after resizing).
    """
    brain = volume != 0
    if not brain.any():
        raise CaseError(f"{path}: volume is empty (all zero)")
    values = volume[brain]
    mean, std = float(values.mean()), float(values.std())
    if std == 0:
        raise CaseError(f"{path}: volume is constant inside the brain")
    scaled = (np.clip((volume - mean) / std, -z_clip, z_clip) + z_clip) * (255.0 / (2 * z_clip))
    return np.where(brain, scaled, 0).astype(np.float32)


def select_slices(
    brain_fraction: np.ndarray, tumour_pixels: np.ndarray, opt: BratsOptions, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Choose (tumour slices, negative slices) from per-slice statistics, both shape (Z,)."""
    tumour = np.flatnonzero(tumour_pixels >= opt.min_tumour_pixels)
    if opt.max_tumour_slices and len(tumour) > opt.max_tumour_slices:
        tumour = tumour[np.unique(np.linspace(0, len(tumour) - 1, opt.max_tumour_slices).round().astype(int))]
    negatives = np.flatnonzero((tumour_pixels == 0) & (brain_fraction >= opt.min_brain_fraction))
    if len(negatives) > opt.negatives_per_case:
        negatives = np.sort(rng.choice(negatives, opt.negatives_per_case, replace=False))
    return [int(k) for k in tumour], [int(k) for k in negatives]


def convert_case(case: Case, out: Path, opt: BratsOptions) -> tuple[list[StructureRecord], list[str]]:
    """Convert one BraTS case; returns (records, notes)."""
    p = case.payload
    files = p["files"]
    seg, seg_zooms = load_volume(files["seg"], np.float32)
    channels = []
    for mod in opt.channels:
        volume, zooms = load_volume(files[mod])
        if volume.shape != seg.shape:
            raise CaseError(
                f"{files[mod]}: shape {volume.shape} differs from the segmentation {files['seg']} {seg.shape}"
            )
        channels.append(zscore_to_uint8_scale(volume, opt.z_clip, files[mod]))
        del volume
    labels = np.rint(seg)
    if not np.array_equal(labels, seg):
        raise CaseError(f"{files['seg']}: segmentation has non-integer values")
    labels = labels.astype(np.int16)
    del seg
    scheme = p["scheme"] if opt.labels == "auto" else opt.labels
    ncr, ed, et = LABELS[scheme]
    found = set(np.unique(labels).tolist())
    if not found <= {0, ncr, ed, et}:
        raise CaseError(
            f"{files['seg']}: unknown label values {sorted(found - {0, ncr, ed, et})} "
            f"(BraTS {scheme} labels are 0, {ncr}, {ed}, {et})"
        )

    brain = np.zeros(labels.shape, dtype=bool)
    for c in channels:
        brain |= c != 0
    brain_fraction = brain.mean(axis=(0, 1))
    tumour_pixels = (labels != 0).sum(axis=(0, 1))
    tumour, negatives = select_slices(brain_fraction, tumour_pixels, opt, case_rng(opt.seed, case.key))

    X, Y, _ = labels.shape
    original_size = (Y, X)
    spacing = stored_spacing((seg_zooms[1], seg_zooms[0]), original_size, opt.size)
    channel_text = ", ".join(CHANNEL_NAMES[c] for c in opt.channels)
    records: list[StructureRecord] = []
    for k in sorted(tumour + negatives):
        sample_id = f"brats_{safe_name(case.key)}_z{k:03d}"
        rgb = np.stack([c[:, :, k].T for c in channels], axis=-1)  # (Y, X, 3): rows posterior-ward
        image = to_uint8(resize_bilinear(rgb, opt.size))
        label_slice = resize_nearest(labels[:, :, k].T, opt.size)
        parts = (label_slice == ncr, label_slice == ed, label_slice == et)
        masks = {}
        for structure in opt.structures:
            mask = np.zeros(label_slice.shape, dtype=bool)
            for used, part in zip(STRUCTURE_PARTS[structure], parts):
                if used:
                    mask |= part
            if mask.any():
                masks[structure] = mask
        rel_image, rel_masks = write_sample(out, sample_id, image, masks, overwrite=True)
        present = [
            name for name, part in zip(("necrotic core", "peritumoral oedema", "enhancing tumour"), parts) if part.any()
        ]
        caption = (
            f"brain MRI, axial slice ({channel_text} as RGB): glioma with {', '.join(present)}"
            if present
            else f"brain MRI, axial slice ({channel_text} as RGB): no tumour visible"
        )
        for structure in opt.structures:
            records.append(
                StructureRecord(
                    sample_id=sample_id,
                    subject_id=patient_id(case.key),
                    dataset=opt.dataset,
                    modality="MRI",
                    structure=structure,
                    prompts=list(PROMPTS[structure]),
                    image=rel_image,
                    mask=rel_masks.get(structure),
                    spacing_mm=spacing,
                    original_size=original_size,
                    source=f"{p['source']}#z={k}",
                    caption=caption,
                )
            )
    notes = [p["seg_note"]] if p["seg_note"] else []
    if not tumour:
        notes.append("no slice with enough tumour pixels (only negatives kept)")
    return records, notes


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the converter; returns the summary (see convert.run_conversion)."""
    parser = base_parser("freqmedclip.data.converters.brats", __doc__, "brain")
    parser.add_argument(
        "--channels",
        nargs=3,
        choices=MODALITIES,
        default=["flair", "t1ce", "t2"],
        metavar=("R", "G", "B"),
        help="modalities stored as R, G, B (flair, t1, t1ce, t2)",
    )
    parser.add_argument(
        "--structures",
        nargs="+",
        choices=STRUCTURES,
        default=list(STRUCTURES),
        metavar="STRUCTURE",
        help=f"records to write, among {', '.join(STRUCTURES)}",
    )
    parser.add_argument(
        "--min-brain-fraction",
        type=float,
        default=0.05,
        help="candidate slices have brain on at least this fraction of the slice",
    )
    parser.add_argument(
        "--min-tumour-pixels", type=int, default=25, help="whole-tumour pixels (240x240 grid) that make a tumour slice"
    )
    parser.add_argument(
        "--max-tumour-slices",
        type=int,
        default=0,
        help="at most this many evenly spaced tumour slices per case (0 = all)",
    )
    parser.add_argument("--negatives-per-case", type=int, default=2, help="tumour-free brain slices per case")
    parser.add_argument("--z-clip", type=float, default=3.0, help="z-scores are clipped to [-Z, Z] -> [0, 255]")
    parser.add_argument(
        "--labels",
        choices=("auto", "2020", "2023"),
        default="auto",
        help="label scheme; auto: 2023 (ET=3) for BraTS-GLI names, else 2020 (ET=4)",
    )
    args = parse_converter_args(parser, argv)

    opt = BratsOptions(
        dataset=args.dataset_name,
        size=args.size,
        channels=tuple(args.channels),
        structures=tuple(args.structures),
        min_brain_fraction=args.min_brain_fraction,
        min_tumour_pixels=args.min_tumour_pixels,
        max_tumour_slices=args.max_tumour_slices,
        negatives_per_case=args.negatives_per_case,
        z_clip=args.z_clip,
        labels=args.labels,
        seed=args.seed,
    )
    cases, skipped = find_cases(args.root)
    grades = read_grades(args.root)
    if not cases and not skipped:
        parser.error(f"no BraTS case found under {args.root}")
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
        stratify=lambda r: f"{r.dataset}/{grades.get(r.subject_id, 'grade unknown')}",
        skipped=skipped,
        limit=args.limit,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
