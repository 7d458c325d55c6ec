"""On-disk 2D dataset format shared by every converter (paper §4, "Datasets"; DATA.md §8).

A dataset root holds::

    images/<sample_id>.png                 uint8, gray (H, W) or RGB (H, W, 3), normally 224x224
    masks/<sample_id>__<structure>.png     binary 0/255, same H, W as the image
    manifest.jsonl                         one StructureRecord per line = one (sample, structure) pair
    splits.json                            {"train"|"val"|"test": [subject ids]}, written with the manifest

Notable choices:
- Every file is written to a temp file in the destination folder and moved with ``os.replace``, so
  an interrupted converter never leaves a truncated PNG under its final name; a rerun skips files
  that already exist (``overwrite=False``), which makes long conversions resumable.
- A negative prompt (target absent) has ``mask=None``; no empty mask file is stored for it.
- Splits are made on subjects, never on slices (DATA.md §0.3), stratified (e.g. per dataset), with
  a per-stratum RNG derived from (seed, stratum) so one dataset's split does not depend on the others.
- Stored intensity normalisation is the converter's job and is documented there (MRI: z-score in
  the brain clipped to [-3, 3]; CT: HU window then min-max; mammography: percentile clip + min-max).
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.jsonl"
SPLITS_FILE = "splits.json"


@dataclass
class StructureRecord:
    """One row of manifest.jsonl: one (sample, structure) pair.

    ``mask is None`` means the structure is absent from the image (a negative prompt, empty target).
    ``spacing_mm`` is (row, col) spacing of the *stored* image; ``original_size`` is (H, W) of the
    source region before resizing. ``metadata`` holds free per-image facts for captions and per-group
    results (e.g. pathology, scanner, nodule size, ``spacing_assumed``); older manifests without it read as {}.
    """

    sample_id: str
    subject_id: str
    dataset: str
    modality: str
    structure: str
    prompts: list[str]
    image: str
    mask: str | None
    spacing_mm: tuple[float, float]
    original_size: tuple[int, int]
    source: str
    split: str = ""
    caption: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def positive(self) -> bool:
        return self.mask is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, row: dict) -> StructureRecord:
        known = {f.name for f in fields(cls)}
        row = {k: v for k, v in row.items() if k in known}
        row["prompts"] = list(row["prompts"])
        row["spacing_mm"] = tuple(float(s) for s in row["spacing_mm"])
        row["original_size"] = tuple(int(s) for s in row["original_size"])
        row["metadata"] = dict(row.get("metadata") or {})
        return cls(**row)


def image_path(sample_id: str) -> str:
    return f"images/{sample_id}.png"


def mask_path(sample_id: str, structure: str) -> str:
    return f"masks/{sample_id}__{structure}.png"


def _atomic_write_bytes(path: Path, write: Callable[[object], None]) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_png(path: Path, array: np.ndarray) -> None:
    _atomic_write_bytes(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def sample_exists(root: Path, sample_id: str, structures: Iterable[str] = ()) -> bool:
    """True when the image and the masks of ``structures`` are already on disk (resume support)."""
    root = Path(root)
    paths = [image_path(sample_id)] + [mask_path(sample_id, s) for s in structures]
    return all((root / p).is_file() for p in paths)


def write_sample(
    root: Path,
    sample_id: str,
    image: np.ndarray,
    masks: dict[str, np.ndarray],
    *,
    overwrite: bool = False,
) -> tuple[str, dict[str, str]]:
    """Atomically write ``images/<sample_id>.png`` and ``masks/<sample_id>__<structure>.png``.

    Args:
        root: dataset root.
        sample_id: filesystem-safe id, unique within the dataset.
        image: uint8 (H, W) or (H, W, 3).
        masks: {structure: (H, W) bool or 0/1 array}; stored as 0/255. Pass only present structures.
        overwrite: rewrite files that already exist (default: keep them, so reruns resume).
    Returns:
        (relative image path, {structure: relative mask path}).
    """
    root = Path(root)
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"{sample_id}: image must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    if "/" in sample_id or "\\" in sample_id or sample_id.startswith("."):
        raise ValueError(f"sample_id is not filesystem-safe: {sample_id!r}")
    rel_image = image_path(sample_id)
    if overwrite or not (root / rel_image).is_file():
        _write_png(root / rel_image, image)
    rel_masks = {}
    for structure, mask in masks.items():
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{sample_id}/{structure}: mask shape {mask.shape} != image {image.shape[:2]}")
        rel = mask_path(sample_id, structure)
        if overwrite or not (root / rel).is_file():
            _write_png(root / rel, np.where(mask != 0, 255, 0).astype(np.uint8))
        rel_masks[structure] = rel
    return rel_image, rel_masks


def _split_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Largest-remainder allocation of n subjects; every split with a non-zero fraction gets one
    subject when there are enough, so tiny strata still reach val and test."""
    raw = [f * n for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n >= sum(f > 0 for f in fractions):
        for i, f in enumerate(fractions):
            if f > 0 and counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return counts


def assign_splits(
    records: list[StructureRecord],
    fractions: tuple[float, float, float] = (0.7, 0.2, 0.1),
    seed: int = 0,
    stratify_by: str | Callable[[StructureRecord], str] | None = "dataset",
) -> None:
    """Fill ``record.split`` in place: 70/20/10 at subject level, stratified, deterministic for a seed.

    ``stratify_by`` is a record attribute name, a function of a record, or None. A subject whose
    records fall in several strata is placed by its most frequent stratum.
    """
    if len(fractions) != len(SPLITS) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 values summing to 1, got {fractions}")
    if stratify_by is None:
        key = lambda r: ""  # noqa: E731
    elif isinstance(stratify_by, str):
        key = lambda r: str(getattr(r, stratify_by))  # noqa: E731
    else:
        key = stratify_by
    votes: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        votes[r.subject_id][key(r)] += 1
    strata: dict[str, list[str]] = defaultdict(list)
    for subject, counter in votes.items():
        stratum = min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        strata[stratum].append(subject)
    split_of: dict[str, str] = {}
    for stratum, subjects in strata.items():
        rng = np.random.default_rng([seed, zlib.crc32(stratum.encode())])
        ordered = sorted(subjects)  # independent of record order
        shuffled = [ordered[i] for i in rng.permutation(len(ordered))]
        start = 0
        for split, count in zip(SPLITS, _split_counts(len(shuffled), fractions)):
            for s in shuffled[start : start + count]:
                split_of[s] = split
            start += count
    for r in records:
        r.split = split_of[r.subject_id]


def write_manifest(root: Path, records: list[StructureRecord]) -> Path:
    """Atomically write ``root/manifest.jsonl`` (and ``root/splits.json`` with subject ids per split)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    text = "".join(r.to_json() + "\n" for r in records).encode()
    path = root / MANIFEST
    _atomic_write_bytes(path, lambda f: f.write(text))
    subjects: dict[str, set[str]] = defaultdict(set)
    for r in records:
        subjects[r.split or "unassigned"].add(r.subject_id)
    split_lists = {k: sorted(v) for k, v in sorted(subjects.items())}
    payload = (json.dumps(split_lists, indent=1) + "\n").encode()
    _atomic_write_bytes(root / SPLITS_FILE, lambda f: f.write(payload))
    return path


def read_manifest(root: Path) -> list[StructureRecord]:
    """Read ``root/manifest.jsonl`` (blank lines ignored)."""
    with open(Path(root) / MANIFEST, encoding="utf-8") as f:
        return [StructureRecord.from_dict(json.loads(line)) for line in f if line.strip()]


def load_image(root: Path, rec: StructureRecord) -> np.ndarray:
    """Stored image as uint8 (H, W, 3); gray images are replicated to 3 channels."""
    with Image.open(Path(root) / rec.image) as im:
        return np.array(im.convert("RGB"))


def load_mask(root: Path, rec: StructureRecord) -> np.ndarray:
    """Binary target as bool (H, W); all False when ``rec.mask`` is None (structure absent)."""
    if rec.mask is None:
        with Image.open(Path(root) / rec.image) as im:
            w, h = im.size
        return np.zeros((h, w), dtype=bool)
    with Image.open(Path(root) / rec.mask) as im:
        return np.asarray(im.convert("L")) > 127
