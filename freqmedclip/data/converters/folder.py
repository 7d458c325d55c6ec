"""Import a folder of images + masks + a prompts CSV into the on-disk format (fine-tune on own data).

``python -m freqmedclip.data.converters.folder --images DIR --masks DIR --prompts prompts.csv --out DIR
[--modality MRI] [--dataset NAME] [--spacing MM] [--seed S] [--workers N] [--limit N] [--fractions 0.7 0.2 0.1]``

prompts.csv columns: ``image`` (file name in --images), ``structure``, ``prompt`` (phrasings
separated by '|', the first one is used for evaluation), optional ``subject_id`` (default: the
image name; splits are made on it), optional ``mask`` (file name in --masks; empty = structure
absent), optional ``split`` (train, val or test: keeps an official split; every row needs one and all
rows of one subject must agree, otherwise the import stops with a message naming the rows).
Without a ``mask`` column, masks are found by name in --masks: ``<stem>__<structure>.*``,
``<stem>_<structure>.*``, then ``<stem>.*``; rows with no match become negatives and are listed.

It runs on the converters' shared runner (:mod:`freqmedclip.data.converters.runner`): one case is one image
with all its rows, cases run in parallel (``--workers``) with a progress bar, a rerun resumes (it
skips images already imported with the same options, rows and file sizes/times, and retries the
skipped ones), and the summary is printed and saved as ``<out>/conversion_<dataset>.json``.

Notable choices:
- Images of any size and type (8/16-bit, float, gray/RGB/RGBA/palette; PNG, JPEG, TIFF, ...) are
  min-max normalised per image to uint8 and resized to ``--size`` (224) square (bilinear, antialiased);
  the aspect ratio is not kept, so the recorded spacing becomes ``spacing * original / size`` per axis.
- Masks are resized nearest-neighbour. Lossless masks must hold exactly two values (0 and one
  foreground value) or they are rejected as non-binary; JPEG masks are lossy by nature and are
  binarised at half their maximum instead.
- Bad inputs never stop the import: an unreadable image skips its rows, a missing, unreadable,
  non-binary or wrongly sized mask skips its row, each with a message naming the file.
- Importing into a root that already has a manifest keeps the other datasets' records and splits.
- With a ``split`` column the given split replaces the 70/20/10 draw (``--fractions`` and ``--seed`` are
  then unused for this dataset); it is checked before anything is converted.
"""

from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from freqmedclip.data.converters.runner import (
    Case,
    CaseError,
    base_parser,
    resize_bilinear,
    run_conversion,
    safe_name,
    stored_spacing,
    to_uint8,
)
from freqmedclip.data.format import SPLITS, StructureRecord, read_manifest, write_sample

VERSION = "folder-1"
SIZE = 224
LOSSY_SUFFIXES = {".jpg", ".jpeg"}
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".gif")


@dataclass(frozen=True)
class FolderOptions:
    dataset: str = "custom"
    modality: str = "unknown"
    spacing: float = 1.0
    size: int = SIZE


def read_array(path: Path) -> np.ndarray:
    """Pixel array of any PIL-readable file: (H, W) or (H, W, C), native dtype (16-bit kept).

    Raises CaseError naming the file when it is missing or unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            return np.asarray(im)
    except FileNotFoundError as e:
        raise CaseError(f"{path}: missing file") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise CaseError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def normalise_image(array: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Any (H, W) / (H, W, C) array -> uint8 (size, size) gray or (size, size, 3) RGB.

    Alpha is dropped, RGB with identical channels becomes gray, intensities are min-max scaled.
    Raises ValueError for a constant or non-finite image."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3:
        array = array[..., :3] if array.shape[2] >= 3 else array[..., 0]
    if (
        array.ndim == 3
        and np.array_equal(array[..., 0], array[..., 1])
        and np.array_equal(array[..., 0], array[..., 2])
    ):
        array = array[..., 0]
    if array.ndim not in (2, 3) or not np.isfinite(array).all():
        raise ValueError(f"unsupported pixel array {array.shape} or non-finite values")
    low, high = float(array.min()), float(array.max())
    if high <= low:
        raise ValueError("constant image")
    scaled = (array - low) / (high - low)
    return to_uint8(resize_bilinear(scaled, size) * 255)


def normalise_mask(array: np.ndarray, lossy: bool, size: int = SIZE) -> np.ndarray:
    """Mask file array (H, W) or (H, W, C) -> bool (size, size); any non-zero colour is foreground.

    Raises ValueError for a lossless mask with more than two values or without 0 among them."""
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., :3].max(axis=-1) if array.shape[2] >= 3 else array[..., 0]
    if lossy:
        binary = array > (float(array.max()) / 2 if array.max() > 0 else 0)
    else:
        values = np.unique(array)
        if len(values) > 2 or (len(values) == 2 and values[0] != 0):
            shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
            raise ValueError(f"non-binary mask values ({len(values)} distinct: {shown})")
        binary = array != 0
    resized = Image.fromarray(binary.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(resized) > 127


def find_mask(masks_dir: Path, image_name: str, structure: str) -> Path | None:
    """Mask for (image, structure) by name: <stem>__<structure>.*, <stem>_<structure>.*, <stem>.*"""
    stem = Path(image_name).stem
    for name in (f"{stem}__{structure}", f"{stem}_{structure}", stem):
        for suffix in MASK_SUFFIXES:
            for candidate in (masks_dir / f"{name}{suffix}", masks_dir / f"{name}{suffix.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def read_prompts(path: Path) -> tuple[list[dict], bool]:
    """Rows of prompts.csv (stripped strings) and whether it has a ``mask`` column.

    Raises SystemExit naming the problem for missing columns or an invalid ``split`` column."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {c.strip() for c in reader.fieldnames or []}
        missing = {"image", "structure", "prompt"} - columns
        if missing:
            raise SystemExit(f"{path}: missing column(s) {sorted(missing)}; found {sorted(columns)}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if "split" in columns:
        check_splits(path, rows)
    return rows, "mask" in columns


def subject_of(row: dict) -> str:
    """Subject id of a prompts.csv row (default: the image name without extension)."""
    return row.get("subject_id") or Path(row["image"]).stem


def check_splits(path: Path, rows: list[dict]) -> None:
    """SystemExit naming the rows when a ``split`` value is not train/val/test or a subject's rows disagree."""
    bad = [f"line {i}: {row.get('split')!r}" for i, row in enumerate(rows, start=2) if row.get("split") not in SPLITS]
    if bad:
        shown = "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise SystemExit(f"{path}: column split must be one of {', '.join(SPLITS)} on every row; got {shown}")
    by_subject: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        by_subject[subject_of(row)].add(row["split"])
    mixed = {subject: sorted(splits) for subject, splits in sorted(by_subject.items()) if len(splits) > 1}
    if mixed:
        shown = "; ".join(f"{subject}: {', '.join(splits)}" for subject, splits in list(mixed.items())[:5])
        raise SystemExit(f"{path}: all rows of one subject must have the same split; {len(mixed)} do not ({shown})")


def given_splits(prompts: Path) -> dict[str, str] | None:
    """{subject: split} from prompts.csv's ``split`` column, or None without one."""
    rows, _ = read_prompts(prompts)
    if not rows or "split" not in rows[0]:
        return None
    return {subject_of(row): row["split"] for row in rows}


def _stamp(path: Path | None) -> list[int] | None:
    """(size, mtime) of a file, so that a rerun converts an image again once it or a mask changed."""
    try:
        st = os.stat(path)
    except (OSError, TypeError):  # missing file, or no mask (None)
        return None
    return [st.st_size, st.st_mtime_ns]


def find_cases(images: Path, masks: Path, prompts: Path, dataset: str) -> tuple[list[Case], list[str]]:
    """One case per image of prompts.csv (sorted by name) with its rows; returns (cases, notes).

    Mask files are resolved here, so the payload (part of the resume fingerprint) changes when a
    row, a file name, or an image or mask file changes."""
    images, masks = Path(images), Path(masks)
    rows, has_mask_column = read_prompts(prompts)
    by_image: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_image[row["image"]].append(row)
    cases: list[Case] = []
    unmatched: list[str] = []
    used_ids: set[str] = set()
    for image_name, image_rows in sorted(by_image.items()):
        base = sample_id = safe_name(f"{dataset}_{Path(image_name).stem}")
        n = 1
        while sample_id in used_ids:
            n += 1
            sample_id = f"{base}_{n}"
        used_ids.add(sample_id)
        entries = []
        for row in image_rows:
            if has_mask_column:
                mask_path = masks / row["mask"] if row.get("mask") else None
            else:
                mask_path = find_mask(masks, image_name, row["structure"])
                if mask_path is None:
                    unmatched.append(f"{image_name}/{row['structure']}")
            entries.append(
                {
                    "structure": row["structure"],
                    "prompt": row["prompt"],
                    "subject_id": subject_of(row),
                    "split": row.get("split", ""),
                    "mask": None if mask_path is None else str(mask_path),
                    "mask_stamp": _stamp(mask_path),
                }
            )
        image_path = images / image_name
        payload = {
            "name": image_name,
            "image": str(image_path),
            "stamp": _stamp(image_path),
            "sample_id": sample_id,
            "rows": entries,
        }
        cases.append(Case(key=sample_id, source=str(image_path), payload=payload))
    notes = []
    if unmatched:
        listed = ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else "")
        notes.append(f"{len(unmatched)} row(s) without a mask file in {masks} were stored as negatives: {listed}")
    return cases, notes


def read_mask(path: Path, shape: tuple[int, int], size: int) -> np.ndarray:
    """Mask file -> bool (size, size); raises CaseError naming the file when it cannot be used."""
    array = read_array(path)
    if array.shape[:2] != shape:
        raise CaseError(f"{path}: mask size {array.shape[1]}x{array.shape[0]} != image size {shape[1]}x{shape[0]}")
    try:
        return normalise_mask(array, path.suffix.lower() in LOSSY_SUFFIXES, size)
    except ValueError as e:
        raise CaseError(f"{path}: {e}") from e


def convert_case(case: Case, out: Path, opt: FolderOptions) -> tuple[list[StructureRecord], list[str], list[str]]:
    """Import one image with its rows; returns (records, notes, skipped masks with reasons)."""
    p = case.payload
    raw = read_array(Path(p["image"]))
    try:
        image = normalise_image(raw, opt.size)
    except ValueError as e:
        raise CaseError(f"{p['image']}: {e}") from e
    shape = raw.shape[:2]
    sample_masks: dict[str, np.ndarray] = {}
    kept, skipped = [], []
    for row in p["rows"]:
        structure = safe_name(row["structure"])
        if row["mask"] is not None:
            try:
                mask = read_mask(Path(row["mask"]), shape, opt.size)
            except CaseError as e:
                skipped.append(str(e))
                continue
            if mask.any():
                sample_masks[structure] = mask
        kept.append((structure, row))
    if not kept:
        return [], [], skipped
    image_rel, mask_rels = write_sample(out, p["sample_id"], image, sample_masks, overwrite=True)
    present = sorted(mask_rels)
    caption = (
        f"{opt.modality} image with {', '.join(s.replace('_', ' ') for s in present)}"
        if present
        else f"{opt.modality} image without findings"
    )
    records = []
    for structure, row in kept:
        records.append(
            StructureRecord(
                sample_id=p["sample_id"],
                subject_id=row["subject_id"],
                dataset=opt.dataset,
                modality=opt.modality,
                structure=structure,
                prompts=[q.strip() for q in row["prompt"].split("|") if q.strip()] or [row["structure"]],
                image=image_rel,
                mask=mask_rels.get(structure),
                spacing_mm=stored_spacing((opt.spacing, opt.spacing), shape, opt.size),
                original_size=shape,
                source=str(Path(p["name"])),
                caption=caption,
            )
        )
    return records, [], skipped


def convert_folder(
    images: Path,
    masks: Path,
    prompts: Path,
    out: Path,
    options: FolderOptions = FolderOptions(),
    *,
    workers: int = 1,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    limit: int | None = None,
) -> dict:
    """Import the folder with the shared runner; returns the summary (see convert.run_conversion)."""
    cases, notes = find_cases(images, masks, prompts, options.dataset)
    split_of = given_splits(prompts)
    if split_of is not None:
        notes.append("splits taken from the split column of prompts.csv")

    def keep_given(records: list[StructureRecord]) -> None:
        for r in records:
            r.split = split_of[r.subject_id]

    return run_conversion(
        dataset=options.dataset,
        out=out,
        cases=cases,
        limit=limit,
        convert=convert_case,
        options=options,
        version=VERSION,
        workers=workers,
        seed=seed,
        fractions=fractions,
        assign=keep_given if split_of is not None else None,
        notes=notes,
        unit="file",
    )


def import_folder(
    images: Path,
    masks: Path,
    prompts: Path,
    out: Path,
    modality: str = "unknown",
    dataset: str = "custom",
    spacing: float = 1.0,
    seed: int = 0,
    *,
    workers: int = 1,
) -> tuple[list[StructureRecord], list[tuple[str, str]]]:
    """Convert the folder; returns (records written for ``dataset``, [(skipped case, reason naming the file)])."""
    options = FolderOptions(dataset=dataset, modality=modality, spacing=spacing)
    summary = convert_folder(images, masks, prompts, out, options, workers=workers, seed=seed)
    records = [r for r in read_manifest(out) if r.dataset == dataset]
    return records, [(s["case"], s["reason"]) for s in summary["skipped"]]


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the importer; returns the summary (see convert.run_conversion)."""
    parser = base_parser("freqmedclip.data.converters.folder", __doc__, "custom", root=False)
    parser.add_argument("--images", type=Path, required=True, help="folder of the images named in prompts.csv")
    parser.add_argument("--masks", type=Path, required=True, help="folder of the masks")
    parser.add_argument(
        "--prompts", type=Path, required=True, help="CSV: image, structure, prompt[, subject_id][, mask][, split]"
    )
    parser.add_argument("--modality", default="unknown", help="free text, e.g. MRI, CT, MG, US")
    parser.add_argument(
        "--spacing", type=float, default=1.0, help="source pixel spacing in mm (1.0 = distances in source pixels)"
    )
    args = parser.parse_args(argv)
    if not args.images.is_dir():
        parser.error(f"--images {args.images} is not a directory")
    if not args.prompts.is_file():
        parser.error(f"--prompts {args.prompts} is not a file")
    options = FolderOptions(dataset=args.dataset_name, modality=args.modality, spacing=args.spacing, size=args.size)
    return convert_folder(
        args.images,
        args.masks,
        args.prompts,
        args.out,
        options,
        workers=args.workers,
        seed=args.seed,
        fractions=args.fractions,
        limit=args.limit,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
