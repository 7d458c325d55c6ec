"""What the three public sources share: prompts, cross-domain negatives, options, checked decoding.

Notable choices:
- Every image gets one record per structure of all three domains: its own (positive, or negative on a
  tumour-free brain slice) and the other two as absent targets ("breast lesion" on a brain MRI), as the
  phantoms do, so the prompt has to matter.
- Spacing is assumed (none of the sources records it): ``metadata["spacing_assumed"] = True`` and
  ``metadata["source_spacing_mm"]`` hold it; ``spacing_mm`` is that value rescaled to the stored grid.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from freqmedclip.data.converters.runner import Case, CaseError, stored_spacing
from freqmedclip.data.format import StructureRecord
from freqmedclip.data.public.fetch import LockedFile, read_verified

STRUCTURE = {"brain": "tumour", "breast": "lesion", "lung": "nodule"}
DATASET = {"brain": "lgg", "breast": "busbra", "lung": "lidc"}
MODALITY = {"brain": "MRI", "breast": "US", "lung": "CT"}
# One line per dataset for checkpoint metadata and the demo (the full texts: LICENSES.md of the converted folder).
LICENCES = {
    "lgg": "CC BY-NC-SA 4.0 (LGG segmentation dataset, Buda et al. 2019; TCGA-LGG via TCIA): non-commercial, "
           "share-alike; weights trained on it carry the same terms",
    "busbra": "BUS-BRA licence (permissive, keep its notice; cite Gomez-Flores et al., Med Phys 2024)",
    "lidc": "CC BY 3.0 (LIDC-IDRI via TCIA; cite Armato et al., Med Phys 2011)",
}
PROMPTS = {
    "tumour": [
        "brain tumour",
        "FLAIR abnormality of the brain",
        "lower-grade glioma",
        "glioma on brain MRI",
        "hyperintense brain lesion on FLAIR",
    ],
    "lesion": [
        "breast lesion",
        "breast tumour on ultrasound",
        "breast mass",
        "hypoechoic lesion in the breast",
        "lesion in breast ultrasound",
    ],
    "nodule": [
        "lung nodule",
        "pulmonary nodule",
        "nodule in the lung",
        "round opacity in the lung parenchyma",
        "lung lesion",
    ],
}


@dataclass(frozen=True)
class PublicOptions:
    """Options of one source (part of each case's resume fingerprint)."""

    domain: str
    dataset: str
    source_spacing_mm: float
    size: int = 224


def payload_file(entry: LockedFile, path: Path) -> dict:
    """Picklable description of one pinned file for a case payload."""
    return {"path": str(path), "entry": [entry.repo, entry.commit, entry.path, entry.bytes, entry.sha256, entry.domain]}


def open_pinned(file: dict) -> Image.Image:
    """Checksum-verified, fully decoded image of a payload file; CaseError naming the file otherwise."""
    entry = LockedFile(*file["entry"])
    data = read_verified(file["path"], entry)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for corrupt or truncated files
        raise CaseError(f"{file['path']}: cannot decode image ({type(e).__name__}: {e})") from e
    return image


def binary_mask(image: Image.Image, path: str, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool from a mask file holding two values at most (0 and one foreground); checks its size."""
    array = np.asarray(image.convert("L") if image.mode not in ("1", "L") else image)
    if array.shape[:2] != shape:
        raise CaseError(f"{path}: mask size {array.shape[1]}x{array.shape[0]} != image size {shape[1]}x{shape[0]}")
    values = np.unique(array)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        raise CaseError(f"{path}: non-binary mask values {values[:5].tolist()}")
    return array != 0


def make_records(
    case: Case,
    opt: PublicOptions,
    *,
    sample_id: str,
    subject_id: str,
    image_rel: str,
    mask_rel: str | None,
    original_size: tuple[int, int],
    prompts: list[str],
    caption: str,
    metadata: dict,
) -> list[StructureRecord]:
    """The image's own structure (with ``mask_rel``, None = absent) and the other domains' as negatives."""
    spacing = stored_spacing((opt.source_spacing_mm, opt.source_spacing_mm), original_size, opt.size)
    metadata = {
        "domain": opt.domain,
        "spacing_assumed": True,
        "source_spacing_mm": opt.source_spacing_mm,
        **metadata,
    }
    own = STRUCTURE[opt.domain]
    records = []
    for structure in [own] + [s for s in PROMPTS if s != own]:
        records.append(
            StructureRecord(
                sample_id=sample_id,
                subject_id=subject_id,
                dataset=opt.dataset,
                modality=MODALITY[opt.domain],
                structure=structure,
                prompts=list(prompts) if structure == own else list(PROMPTS[structure]),
                image=image_rel,
                mask=mask_rel if structure == own else None,
                spacing_mm=spacing,
                original_size=original_size,
                source=case.source,
                caption=caption,
                metadata=dict(metadata),
            )
        )
    return records
