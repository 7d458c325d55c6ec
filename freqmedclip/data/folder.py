"""Import a folder of images + masks + a prompts CSV into the on-disk format (fine-tune on own data).

``python -m freqmedclip.data.folder --images DIR --masks DIR --prompts prompts.csv --out DIR
[--modality MRI] [--dataset NAME] [--spacing MM]``

prompts.csv columns: ``image`` (file name in --images), ``structure``, ``prompt`` (phrasings
separated by '|', the first one is used for evaluation), optional ``subject_id`` (default: the
image name; splits are made on it), optional ``mask`` (file name in --masks; empty = structure
absent). Without a ``mask`` column, masks are found by name in --masks: ``<stem>__<structure>.*``,
``<stem>_<structure>.*``, then ``<stem>.*``; rows with no match become negatives and are listed.

Notable choices:
- Images of any size and type (8/16-bit, float, gray/RGB/RGBA/palette; PNG, JPEG, TIFF, ...) are
  min-max normalised per image to uint8 and resized to 224x224 (bilinear, antialiased); the aspect
  ratio is not kept, so the recorded spacing becomes ``spacing * original / 224`` per axis.
- Masks are resized nearest-neighbour. Lossless masks must hold exactly two values (0 and one
  foreground value) or they are rejected as non-binary; JPEG masks are lossy by nature and are
  binarised at half their maximum instead.
- Bad inputs never stop the import: an unreadable image skips its rows, a missing, unreadable,
  non-binary or wrongly sized mask skips its row, each with a message naming the file.
- Importing into a root that already has a manifest keeps the other datasets' records and splits.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from freqmedclip.data.format import StructureRecord, assign_splits, read_manifest, write_manifest, write_sample

SIZE = 224
LOSSY_SUFFIXES = {".jpg", ".jpeg"}
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".gif")


class BadFile(ValueError):
    """An input file that is skipped (the message says why)."""


def read_array(path: Path) -> np.ndarray:
    """Pixel array of any PIL-readable file: (H, W) or (H, W, C), native dtype (16-bit kept)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            return np.asarray(im)
    except FileNotFoundError as e:
        raise BadFile("missing file") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise BadFile(f"unreadable ({type(e).__name__}: {e})") from e


def normalise_image(array: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Any (H, W) / (H, W, C) array -> uint8 (size, size) gray or (size, size, 3) RGB.

    Alpha is dropped, RGB with identical channels becomes gray, intensities are min-max scaled."""
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
        raise BadFile(f"unsupported pixel array {array.shape} or non-finite values")
    low, high = float(array.min()), float(array.max())
    if high <= low:
        raise BadFile("constant image")
    scaled = (array - low) / (high - low)
    channels = [scaled] if scaled.ndim == 2 else [scaled[..., c] for c in range(3)]
    resized = [
        np.asarray(Image.fromarray(ch, mode="F").resize((size, size), Image.Resampling.BILINEAR)) for ch in channels
    ]
    out = np.stack(resized, axis=-1) if len(resized) == 3 else resized[0]
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def normalise_mask(array: np.ndarray, lossy: bool, size: int = SIZE) -> np.ndarray:
    """Mask file array (H, W) or (H, W, C) -> bool (size, size); any non-zero colour is foreground."""
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., :3].max(axis=-1) if array.shape[2] >= 3 else array[..., 0]
    if lossy:
        binary = array > (float(array.max()) / 2 if array.max() > 0 else 0)
    else:
        values = np.unique(array)
        if len(values) > 2 or (len(values) == 2 and values[0] != 0):
            shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
            raise BadFile(f"non-binary mask values ({len(values)} distinct: {shown})")
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


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def read_prompts(path: Path) -> tuple[list[dict], bool]:
    """Rows of prompts.csv (stripped strings) and whether it has a ``mask`` column."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {c.strip() for c in reader.fieldnames or []}
        missing = {"image", "structure", "prompt"} - columns
        if missing:
            raise SystemExit(f"{path}: missing column(s) {sorted(missing)}; found {sorted(columns)}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    return rows, "mask" in columns


def import_folder(
    images: Path,
    masks: Path,
    prompts: Path,
    out: Path,
    modality: str = "unknown",
    dataset: str = "custom",
    spacing: float = 1.0,
    seed: int = 0,
) -> tuple[list[StructureRecord], list[tuple[str, str]]]:
    """Convert the folder; returns (records written for ``dataset``, [(skipped file, reason)])."""
    images, masks, out = Path(images), Path(masks), Path(out)
    rows, has_mask_column = read_prompts(prompts)
    by_image: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_image[row["image"]].append(row)
    records: list[StructureRecord] = []
    skipped: list[tuple[str, str]] = []
    unmatched: list[str] = []
    used_ids: set[str] = set()
    for image_name, image_rows in tqdm(sorted(by_image.items()), desc=f"import {dataset}", unit="image"):
        try:
            raw = read_array(images / image_name)
            image = normalise_image(raw)
        except BadFile as e:
            skipped.append((str(images / image_name), str(e)))
            continue
        height, width = raw.shape[:2]
        sample_id = safe_id(f"{dataset}_{Path(image_name).stem}")
        while sample_id in used_ids:
            sample_id += "_"
        used_ids.add(sample_id)
        sample_masks: dict[str, np.ndarray] = {}
        kept_rows = []
        for row in image_rows:
            structure = safe_id(row["structure"])
            if has_mask_column:
                mask_path = masks / row["mask"] if row.get("mask") else None
            else:
                mask_path = find_mask(masks, image_name, row["structure"])
                if mask_path is None:
                    unmatched.append(f"{image_name}/{row['structure']}")
            if mask_path is not None:
                try:
                    mask_raw = read_array(mask_path)
                    if mask_raw.shape[:2] != (height, width):
                        raise BadFile(
                            f"mask size {mask_raw.shape[1]}x{mask_raw.shape[0]} != image size {width}x{height}"
                        )
                    mask = normalise_mask(mask_raw, mask_path.suffix.lower() in LOSSY_SUFFIXES)
                except BadFile as e:
                    skipped.append((str(mask_path), str(e)))
                    continue
                if mask.any():
                    sample_masks[structure] = mask
            kept_rows.append((structure, row))
        if not kept_rows:
            continue
        image_rel, mask_rels = write_sample(out, sample_id, image, sample_masks)
        present = sorted(mask_rels)
        caption = (
            f"{modality} image with {', '.join(s.replace('_', ' ') for s in present)}"
            if present
            else f"{modality} image without findings"
        )
        for structure, row in kept_rows:
            phrasings = [p.strip() for p in row["prompt"].split("|") if p.strip()] or [row["structure"]]
            records.append(
                StructureRecord(
                    sample_id=sample_id,
                    subject_id=row.get("subject_id") or Path(image_name).stem,
                    dataset=dataset,
                    modality=modality,
                    structure=structure,
                    prompts=phrasings,
                    image=image_rel,
                    mask=mask_rels.get(structure),
                    spacing_mm=(spacing * height / SIZE, spacing * width / SIZE),
                    original_size=(height, width),
                    source=str(Path(image_name)),
                    caption=caption,
                )
            )
    if unmatched:
        listed = ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else "")
        print(f"{len(unmatched)} row(s) without a mask file in {masks} were stored as negatives: {listed}")
    assign_splits(records, seed=seed, stratify_by="dataset")
    others = [r for r in read_manifest(out) if r.dataset != dataset] if (out / "manifest.jsonl").is_file() else []
    write_manifest(out, others + records)
    return records, skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument(
        "--prompts", type=Path, required=True, help="CSV: image, structure, prompt[, subject_id][, mask]"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modality", default="unknown", help="free text, e.g. MRI, CT, MG, US")
    parser.add_argument("--dataset", default="custom", help="dataset name used in tables and for sampling balance")
    parser.add_argument(
        "--spacing", type=float, default=1.0, help="source pixel spacing in mm (1.0 = distances in source pixels)"
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    args = parser.parse_args(argv)
    records, skipped = import_folder(
        args.images, args.masks, args.prompts, args.out, args.modality, args.dataset, args.spacing, args.seed
    )
    n_pos, n_neg, n_images = (
        sum(r.positive for r in records),
        sum(not r.positive for r in records),
        len({r.sample_id for r in records}),
    )
    print(f"converted {n_images} images, {len(records)} records ({n_pos} positive, {n_neg} negative) -> {args.out}")
    for split in ("train", "val", "test"):
        print(f"  {split}: {len({r.sample_id for r in records if r.split == split})} images")
    if skipped:
        print(f"skipped {len(skipped)} file(s):")
        for path, reason in skipped:
            print(f"  {path}: {reason}")


if __name__ == "__main__":
    main()
