"""Lung CT: LIDC-IDRI nodule crops (via Pulmoseg) -> the on-disk format, with the 50 % reader consensus.

Source: ``LIDC-IDRI-slices/LIDC-IDRI-XXXX/nodule-N/images/slice-K.png``, a 128x128 uint8 crop centred on the
nodule (already min-max normalised per crop by the source, not HU), and ``mask-0..3/slice-K.png``, the
outlines of up to four radiologists separately. One case = one crop; the subject (split unit) is the
patient, so no patient, and hence no nodule, straddles splits.

Notable choices:
- The mask is the LIDC 50 % consensus: a pixel is in when at least 2 of the 4 readers marked it (half of
  four; it equals pylidc's ``consensus(clevel=0.5)`` when all four readers drew the nodule). A crop where
  fewer than 2 readers drew anything has no consensus and is left out (not an error), as is one whose
  readers' outlines do not overlap; both are counted in the summary's notes.
- ``metadata["readers"]`` is the number of readers who drew the nodule; ``consensus_area_px`` (on the 128
  grid), ``consensus_area_mm2`` and ``equivalent_diameter_mm`` (at the assumed spacing) allow per-size results.
- Crops stay crops: the model segments a nodule in a 128x128 crop around it, not in a whole slice. The
  crop is upsized to 224 (bilinear image, nearest mask) with its source min-max intensities kept.
- Spacing is assumed 0.7 mm: LIDC-IDRI's in-plane spacing is 0.5-0.9 mm (512x512 over 260-460 mm fields of
  view), and the crops do not say which; 0.7 is the middle of that range.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from freqmedclip.data.converters.runner import Case, CaseError, resize_bilinear, resize_nearest, safe_name, to_uint8
from freqmedclip.data.format import StructureRecord, write_sample
from freqmedclip.data.public.common import PROMPTS, PublicOptions, binary_mask, make_records, open_pinned, payload_file
from freqmedclip.data.public.fetch import LockedFile

VERSION = "lidc-1"
ASSUMED_SPACING_MM = 0.7
READERS = 4
CONSENSUS_MIN_READERS = 2  # the 50 % level of four readers
CROP = re.compile(
    r"^LIDC-IDRI-slices/(?P<patient>LIDC-IDRI-\d+)/(?P<nodule>nodule-\d+)/"
    r"(?P<kind>images|mask-[0-3])/slice-(?P<k>\d+)\.png$"
)
NO_CONSENSUS = (
    f"crop left out: fewer than {CONSENSUS_MIN_READERS} of {READERS} readers drew the nodule (no 50 % consensus)"
)
NO_OVERLAP = "crop left out: the readers' outlines do not overlap (empty 50 % consensus)"


def find_cases(
    entries: Sequence[LockedFile], locate: Callable[[LockedFile], Path]
) -> tuple[list[Case], list[tuple[str, str]]]:
    """One case per crop of the lock with its four reader masks; returns (cases, [(case, reason)])."""
    crops: dict[tuple[str, str, int], dict[str, LockedFile]] = {}
    for e in entries:
        m = CROP.match(e.path)
        if m:
            crops.setdefault((m["patient"], m["nodule"], int(m["k"])), {})[m["kind"]] = e
    cases, skipped = [], []
    expected = {"images"} | {f"mask-{r}" for r in range(READERS)}
    for (patient, nodule, k), files in sorted(crops.items()):
        key = f"{patient}_{nodule}_slice-{k}"
        if set(files) != expected:
            skipped.append((key, f"the lock pins no {', '.join(sorted(expected - set(files)))} for crop {key}"))
            continue
        payload = {
            "image": payload_file(files["images"], locate(files["images"])),
            "masks": [payload_file(files[f"mask-{r}"], locate(files[f"mask-{r}"])) for r in range(READERS)],
            "patient": patient,
            "nodule": nodule,
            "slice": k,
        }
        cases.append(Case(key=key, source=files["images"].key, payload=payload))
    return cases, skipped


def consensus(readers: Sequence[np.ndarray]) -> np.ndarray:
    """50 % consensus of four reader masks (each (H, W) bool): pixels marked by at least 2 readers."""
    return np.sum(np.stack(readers), axis=0) >= CONSENSUS_MIN_READERS


def size_bin(diameter_mm: float) -> str:
    """Split stratum and per-size group of a nodule from its equivalent diameter."""
    return "<6mm" if diameter_mm < 6 else "6-10mm" if diameter_mm < 10 else ">=10mm"


def convert_case(case: Case, out: Path, opt: PublicOptions) -> tuple[list[StructureRecord], list[str]]:
    """Convert one crop; returns (records, notes); no records for a crop without consensus."""
    p = case.payload
    image = open_pinned(p["image"])
    gray = np.asarray(image.convert("L") if image.mode != "L" else image)
    shape = gray.shape[:2]
    readers = [binary_mask(open_pinned(f), f["path"], shape) for f in p["masks"]]
    drew = sum(bool(m.any()) for m in readers)
    if drew < CONSENSUS_MIN_READERS:
        return [], [NO_CONSENSUS]
    mask = consensus(readers)
    if not mask.any():
        return [], [NO_OVERLAP]
    low, high = float(gray.min()), float(gray.max())
    if high <= low:
        raise CaseError(f"{p['image']['path']}: constant crop")
    scaled = (gray.astype(np.float32) - low) * (255.0 / (high - low))
    sample_id = safe_name(f"lidc_{case.key}")
    rel_image, rel_masks = write_sample(
        out, sample_id, to_uint8(resize_bilinear(scaled, opt.size)), {"nodule": resize_nearest(mask, opt.size)},
        overwrite=True,
    )
    area_px = int(mask.sum())
    area_mm2 = area_px * opt.source_spacing_mm**2
    diameter = 2.0 * math.sqrt(area_mm2 / math.pi)
    metadata = {
        "patient": p["patient"],
        "nodule": f"{p['patient']}/{p['nodule']}",
        "slice": p["slice"],
        "readers": drew,
        "reader_area_px": [int(m.sum()) for m in readers],
        "consensus_area_px": area_px,
        "consensus_area_mm2": round(area_mm2, 3),
        "equivalent_diameter_mm": round(diameter, 2),
        "size_bin": size_bin(diameter),
    }
    caption = f"chest CT, crop around a pulmonary nodule of about {diameter:.0f} mm"
    prompts = list(PROMPTS["nodule"]) + [f"{diameter:.0f} mm pulmonary nodule"]
    return (
        make_records(
            case,
            opt,
            sample_id=sample_id,
            subject_id=p["patient"],
            image_rel=rel_image,
            mask_rel=rel_masks["nodule"],
            original_size=shape,
            prompts=prompts,
            caption=caption,
            metadata=metadata,
        ),
        [],
    )
