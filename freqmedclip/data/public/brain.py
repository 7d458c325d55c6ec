"""Brain MRI: the LGG segmentation dataset ("kaggle_3m", TCGA-LGG, Buda et al. 2019) -> the on-disk format.

Source: ``kaggle_3m/<patient dir>/<patient dir>_<k>.tif``, a 256x256 RGB TIFF slice whose channels are
(pre-contrast T1, FLAIR, post-contrast T1), and ``<patient dir>_<k>_mask.tif``, the FLAIR abnormality
{0, 255}; ``kaggle_3m/data.csv`` holds TCGA clinical codes per patient. One case = one slice.

Notable choices:
- Channels are reordered to (FLAIR, post-contrast T1, pre-contrast T1) as RGB: FLAIR, the sequence the
  mask was drawn on, comes first as in the BraTS converter (FLAIR, T1ce, T2); there is no T2 here. A
  sequence the source replaced by FLAIR (identical channels) is listed in ``metadata["replaced_by_flair"]``.
- MRI normalisation as everywhere (BraTS converter, ``preprocess`` "MRI"): per channel, z-score over the
  non-zero pixels, clipped to [-3, 3], mapped to [0, 255], background 0. The statistics are per slice,
  since the source has no volumes; the bytes are already 8-bit display values, the z-score only puts
  them on the scale the other MRI data use.
- Structure ``tumour``; a slice whose mask is empty is a real negative (an absent-target record).
- Spacing is assumed 0.94 mm (a 240 mm field of view on the 256 grid; the source has no header).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from freqmedclip.data.converters.runner import (
    Case,
    CaseError,
    resize_bilinear,
    resize_nearest,
    safe_name,
    to_uint8,
)
from freqmedclip.data.format import StructureRecord, write_sample
from freqmedclip.data.public.common import PROMPTS, PublicOptions, binary_mask, make_records, open_pinned, payload_file
from freqmedclip.data.public.fetch import LockedFile

VERSION = "lgg-1"
ASSUMED_SPACING_MM = 0.94
SOURCE_CHANNELS = ("pre-contrast T1", "FLAIR", "post-contrast T1")
STORED_ORDER = (1, 2, 0)  # FLAIR, post-contrast T1, pre-contrast T1
CLINICAL_CSV = "kaggle_3m/data.csv"
SLICE = re.compile(r"^kaggle_3m/(?P<dir>[^/]+)/(?P=dir)_(?P<k>\d+)(?P<mask>_mask)?\.tif$")
Z_CLIP = 3.0


def patient_of(folder: str) -> str:
    """TCGA patient id of a slice folder: ``TCGA_CS_4943_20000902`` -> ``TCGA_CS_4943``."""
    return "_".join(folder.split("_")[:3])


def read_clinical(data: bytes) -> dict[str, dict[str, str]]:
    """{patient: {column: raw TCGA code}} from data.csv (codes kept as given, not decoded)."""
    rows = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    return {r["Patient"]: {k: v for k, v in r.items() if k != "Patient" and v} for r in rows if r.get("Patient")}


def find_cases(
    entries: Sequence[LockedFile], locate: Callable[[LockedFile], Path], clinical: dict[str, dict[str, str]]
) -> tuple[list[Case], list[tuple[str, str]]]:
    """One case per slice of the lock; returns (cases, [(case, reason)] for slices without image or mask)."""
    slices: dict[tuple[str, int], dict[str, LockedFile]] = {}
    for e in entries:
        m = SLICE.match(e.path)
        if m:
            slices.setdefault((m["dir"], int(m["k"])), {})["mask" if m["mask"] else "image"] = e
    cases, skipped = [], []
    for (folder, k), files in sorted(slices.items()):
        key = f"{folder}_{k}"
        if set(files) != {"image", "mask"}:
            skipped.append((key, f"the lock pins only the {', '.join(files)} of slice {key}"))
            continue
        payload = {
            "image": payload_file(files["image"], locate(files["image"])),
            "mask": payload_file(files["mask"], locate(files["mask"])),
            "patient": patient_of(folder),
            "slice": k,
            "clinical": clinical.get(patient_of(folder), {}),
        }
        cases.append(Case(key=key, source=files["image"].key, payload=payload))
    return cases, skipped


def normalise_mri(channel: np.ndarray) -> np.ndarray:
    """One MRI channel (H, W) -> float32 (H, W) in [0, 255]: z-score over non-zero pixels, clip +-3; background 0."""
    channel = channel.astype(np.float32)
    brain = channel != 0
    values = channel[brain]
    if values.size < 2 or values.std() == 0:
        return np.zeros_like(channel)
    z = np.clip((channel - values.mean()) / values.std(), -Z_CLIP, Z_CLIP)
    return np.where(brain, (z + Z_CLIP) * (255.0 / (2 * Z_CLIP)), 0).astype(np.float32)


def caption_for(tumour: bool) -> str:
    text = "brain MRI, axial slice (FLAIR, post-contrast T1, pre-contrast T1 as RGB)"
    return f"{text}: lower-grade glioma, FLAIR abnormality" if tumour else f"{text}: no tumour in this slice"


def convert_case(case: Case, out: Path, opt: PublicOptions) -> tuple[list[StructureRecord], list[str]]:
    """Convert one slice; returns (records, notes)."""
    p = case.payload
    image = open_pinned(p["image"])
    if image.mode != "RGB":
        raise CaseError(f"{p['image']['path']}: expected an RGB TIFF (T1, FLAIR, T1ce), got mode {image.mode}")
    rgb = np.asarray(image)
    shape = rgb.shape[:2]
    tumour = binary_mask(open_pinned(p["mask"]), p["mask"]["path"], shape)
    flair = rgb[..., 1]
    replaced = [SOURCE_CHANNELS[c] for c in (0, 2) if np.array_equal(rgb[..., c], flair)]
    stored = np.stack([normalise_mri(rgb[..., c]) for c in STORED_ORDER], axis=-1)
    sample_id = safe_name(f"lgg_{case.key}")
    present = bool(tumour.any())
    stored_mask = resize_nearest(tumour, opt.size)
    if present and not stored_mask.any():
        raise CaseError(f"{p['mask']['path']}: tumour covers no pixel centre at {opt.size}x{opt.size}")
    rel_image, rel_masks = write_sample(
        out,
        sample_id,
        to_uint8(resize_bilinear(stored, opt.size)),
        {"tumour": stored_mask} if present else {},
        overwrite=True,
    )
    metadata = {
        "patient": p["patient"],
        "slice": p["slice"],
        "tumour_present": present,
        "tumour_area_px": int(tumour.sum()),
        "channels": [SOURCE_CHANNELS[c] for c in STORED_ORDER],
        "replaced_by_flair": replaced,
        "tcga_clinical_codes": p["clinical"],
    }
    records = make_records(
        case,
        opt,
        sample_id=sample_id,
        subject_id=p["patient"],
        image_rel=rel_image,
        mask_rel=rel_masks.get("tumour"),
        original_size=shape,
        prompts=PROMPTS["tumour"],
        caption=caption_for(present),
        metadata=metadata,
    )
    return records, [f"slice with {' and '.join(replaced)} replaced by FLAIR in the source"] if replaced else []
