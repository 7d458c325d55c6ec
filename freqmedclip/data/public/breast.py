"""Breast ultrasound: BUS-BRA (Gómez-Flores et al. 2024) -> the on-disk format.

Source: ``BUSBRA/Images/bus_<case>-<view>.png`` (8-bit gray, 240-579 px wide), ``BUSBRA/Masks/mask_<case>-<view>.png``
(1-bit, every one non-empty) and ``BUSBRA/bus_data.csv`` (ID, Case, Histology, Pathology, BIRADS, Device, Width,
Height, Side, BBOX). One case = one image; the subject (split unit) is the patient, ``Case``.

Notable choices:
- New modality ``US``: clipped to the 0.5-99.5 percentiles, then min-max (``preprocess`` "US" does the
  same), because B-mode intensities have no unit and burned-in white scanner text and calipers would
  otherwise set the maximum. The text and calipers stay in the image: they are a shortcut a model can
  learn, which per-device results (``metadata["device"]``) can expose.
- The image is resized to 224x224 without keeping its aspect ratio; the (row, col) spacing records it.
- Pathology, BI-RADS, histology, device, side and the source bounding box go to the record metadata;
  the caption names pathology, BI-RADS and histology, not the scanner.
- Spacing is assumed 0.1 mm: BUS-BRA gives none; 10-14 MHz linear probes image 3-5 cm of depth on the
  300-500 rows these images have. HD95 in mm on this dataset is therefore only comparable within it.
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

VERSION = "busbra-1"
ASSUMED_SPACING_MM = 0.1
PERCENTILE_CLIP = (0.5, 99.5)
TABLE_CSV = "BUSBRA/bus_data.csv"
LICENSE = "BUSBRA/LICENSE.txt"
IMAGE = re.compile(r"^BUSBRA/Images/bus_(?P<id>[^/]+)\.png$")
MASK = re.compile(r"^BUSBRA/Masks/mask_(?P<id>[^/]+)\.png$")


def read_table(data: bytes) -> dict[str, dict[str, str]]:
    """{image id (e.g. ``bus_0001-l``): row} from bus_data.csv."""
    return {r["ID"]: r for r in csv.DictReader(io.StringIO(data.decode("utf-8-sig"))) if r.get("ID")}


def find_cases(
    entries: Sequence[LockedFile], locate: Callable[[LockedFile], Path], table: dict[str, dict[str, str]]
) -> tuple[list[Case], list[tuple[str, str]]]:
    """One case per image of the lock with its mask and table row; returns (cases, [(case, reason)])."""
    images = {m["id"]: e for e in entries if (m := IMAGE.match(e.path))}
    masks = {m["id"]: e for e in entries if (m := MASK.match(e.path))}
    cases, skipped = [], []
    for image_id in sorted(images.keys() | masks.keys()):
        key = f"bus_{image_id}"
        if image_id not in images or image_id not in masks:
            skipped.append((key, f"the lock pins only the {'image' if image_id in images else 'mask'} of {key}"))
            continue
        row = table.get(key)
        if row is None:
            skipped.append((key, f"{images[image_id].key}: no row {key} in {TABLE_CSV}"))
            continue
        payload = {
            "image": payload_file(images[image_id], locate(images[image_id])),
            "mask": payload_file(masks[image_id], locate(masks[image_id])),
            "row": row,
        }
        cases.append(Case(key=key, source=images[image_id].key, payload=payload))
    return cases, skipped


def normalise_us(image: np.ndarray) -> np.ndarray:
    """Ultrasound (H, W) -> float32 (H, W) in [0, 1]: clip to the 0.5-99.5 percentiles, then min-max."""
    x = image.astype(np.float32)
    low, high = np.percentile(x, PERCENTILE_CLIP)
    x = np.clip(x, low, high)
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


def describe(row: dict[str, str]) -> tuple[dict, str]:
    """(metadata, caption) of a bus_data.csv row."""
    pathology = row.get("Pathology", "").strip().lower()
    birads = row.get("BIRADS", "").strip()
    histology = row.get("Histology", "").strip()
    metadata = {
        "patient_case": row.get("Case", "").strip(),
        "pathology": pathology,
        "birads": birads,
        "histology": histology,
        "device": row.get("Device", "").strip(),
        "side": row.get("Side", "").strip(),
        "bbox_xywh": row.get("BBOX", "").strip(),
        "malignant": pathology == "malignant" if pathology in ("benign", "malignant") else None,
    }
    parts = [f"{pathology} lesion" if pathology else "lesion"]
    if birads:
        parts.append(f"BI-RADS {birads}")
    if histology:
        parts.append(histology)
    return metadata, "breast ultrasound: " + ", ".join(parts)


def convert_case(case: Case, out: Path, opt: PublicOptions) -> tuple[list[StructureRecord], list[str]]:
    """Convert one image; returns (records, notes)."""
    p = case.payload
    image = open_pinned(p["image"])
    if image.mode not in ("L", "I;16", "I"):
        image = image.convert("L")  # an RGB or palette export of a gray scan
    gray = np.asarray(image)
    shape = gray.shape[:2]
    lesion = binary_mask(open_pinned(p["mask"]), p["mask"]["path"], shape)
    if not lesion.any():
        raise CaseError(f"{p['mask']['path']}: empty lesion mask (BUS-BRA masks are all non-empty)")
    stored_mask = resize_nearest(lesion, opt.size)
    if not stored_mask.any():
        raise CaseError(f"{p['mask']['path']}: lesion covers no pixel centre at {opt.size}x{opt.size}")
    sample_id = safe_name(case.key)
    rel_image, rel_masks = write_sample(
        out, sample_id, to_uint8(resize_bilinear(normalise_us(gray) * 255.0, opt.size)), {"lesion": stored_mask},
        overwrite=True,
    )
    metadata, caption = describe(p["row"])
    metadata["lesion_area_px"] = int(lesion.sum())
    case_number = metadata["patient_case"]
    subject = f"busbra_{int(case_number):04d}" if case_number.isdigit() else safe_name(f"busbra_{case.key}")
    prompts = list(PROMPTS["lesion"])
    if metadata["pathology"]:
        prompts.append(f"{metadata['pathology']} breast lesion")
    return (
        make_records(
            case,
            opt,
            sample_id=sample_id,
            subject_id=subject,
            image_rel=rel_image,
            mask_rel=rel_masks["lesion"],
            original_size=shape,
            prompts=prompts,
            caption=caption,
            metadata=metadata,
        ),
        [],
    )
