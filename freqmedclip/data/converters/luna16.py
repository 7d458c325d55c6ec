"""LUNA16 lung CT -> 2D axial nodule slices in the FreqMedCLIP format (paper §4; DATA.md §3, §8).

Layout read: ``<root>/subset*/<seriesuid>.mhd`` + ``.raw`` (MetaImage, values in HU) and
``annotations.csv`` (``seriesuid,coordX,coordY,coordZ,diameter_mm``, world mm; found under ``--root``
unless ``--annotations`` is given). ``seg-lungs-LUNA16/*.mhd`` (lung masks, ``.zraw``),
``candidates*.csv`` and ``annotations_excluded.csv`` are not used.

Geometry: world -> voxel goes through SimpleITK's ``TransformPhysicalPointToContinuousIndex``, which
is exact for any direction matrix, including the LUNA scans whose TransformMatrix flips x and y
(the ``abs(world - origin) / spacing`` shortcut is not used). Slices are shown in one canonical
orientation whatever the direction: columns along +x (patient right -> left), rows along +y
(anterior -> posterior), i.e. flipped axes are flipped back.

Masks: LUNA16 gives only a centre and a diameter, so a nodule is a sphere of that diameter. Its
mask on a stored slice is the set of stored pixels whose centre, mapped back to world coordinates,
lies inside the sphere (rasterised directly on the 224 grid, so no resize error; anisotropic pixels
give an ellipse). The true masks are the LIDC-IDRI reader contours (the paper's "3D nodule masks
annotated by four radiologists"); boundary metrics on spheres partly measure the sphere fit.

Samples per series:

- for every nodule, the slice nearest its centre and up to ``--nodule-slices`` slices on each side
  that still cut the sphere; each sample's target is the union of all nodules on that slice. A
  slice where every nodule covers no stored pixel centre (tiny nodule at 224) is not used;
- ``--negatives-per-series`` tumour-free slices (seeded), at least ``--negative-margin`` mm beyond
  every nodule's surface and with lung on at least ``--min-lung-fraction`` of the slice (lung =
  HU in [-950, -500], a heuristic that excludes outside air at about -1000 HU); series without
  nodules contribute negatives only.

Intensity: HU clipped to ``--hu-window`` (default lung window WL -600 / WW 1500 = [-1350, 150]), then
min-max over the window to [0, 255]. Resize (H, W) -> ``--size``: bilinear image; spacing = pixel
spacing x source size / 224 per axis (it varies per scan). The subject is the seriesuid; the split
is stratified by the series' largest nodule (none, < 6, 6-10, >= 10 mm). The paper reports
4,200 / 1,000 / 500 slices; the defaults give at most 5 slices per nodule (1,186 nodules) plus 2
negatives per series (888 series).

Usage::

    python -m freqmedclip.data.converters.luna16 --root LUNA16 --out data/luna --workers 4
"""

from __future__ import annotations

import csv
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from freqmedclip.data.converters.runner import (
    Case,
    CaseError,
    base_parser,
    case_rng,
    parse_converter_args,
    pixel_centres,
    relative,
    resize_bilinear,
    run_conversion,
    safe_name,
    stored_spacing,
    to_uint8,
)
from freqmedclip.data.format import StructureRecord, write_sample

VERSION = "luna16-1"
SUBSET = re.compile(r"^subset\d+$", re.IGNORECASE)
LUNG_HU = (-950.0, -500.0)
ELEMENT_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
}
PROMPTS = [
    "lung nodule",
    "pulmonary nodule",
    "nodule in the lung",
    "round opacity in the lung parenchyma",
    "lung lesion",
]


@dataclass(frozen=True)
class LunaOptions:
    dataset: str = "lung"
    size: int = 224
    hu_window: tuple[float, float] = (-1350.0, 150.0)
    nodule_slices: int = 2
    negatives_per_series: int = 2
    negative_margin: float = 5.0
    min_lung_fraction: float = 0.05
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# indexing the download
# ---------------------------------------------------------------------------------------------


def find_scans(root: Path) -> list[Path]:
    """``subset*/*.mhd`` under ``root``; without subset folders, every .mhd outside ``seg-lungs*``."""
    scans = sorted(p for p in Path(root).rglob("*.mhd") if SUBSET.match(p.parent.name))
    if not scans:
        scans = sorted(
            p for p in Path(root).rglob("*.mhd") if not any(part.lower().startswith("seg-lungs") for part in p.parts)
        )
    return scans


def read_annotations(path: Path) -> tuple[dict[str, list[tuple[float, float, float, float]]], list[tuple[str, str]]]:
    """{seriesuid: [(x, y, z, diameter_mm)]} from annotations.csv, plus (row, reason) for bad rows."""
    nodules: dict[str, list[tuple[float, float, float, float]]] = {}
    bad = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                uid = row["seriesuid"].strip()
                values = tuple(float(row[k]) for k in ("coordX", "coordY", "coordZ", "diameter_mm"))
                if not uid or not all(math.isfinite(v) for v in values) or values[3] <= 0:
                    raise ValueError("empty uid, non-finite value or diameter <= 0")
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                bad.append((f"{path.name}:{line}", f"unusable annotation row ({e})"))
                continue
            nodules.setdefault(uid, []).append(values)
    return nodules, bad


def size_bin(diameters: Sequence[float]) -> str:
    """Split stratum of a series from its nodule diameters (mm)."""
    if not diameters:
        return "no nodule"
    d = max(diameters)
    return "<6mm" if d < 6 else "6-10mm" if d < 10 else ">=10mm"


def find_cases(root: Path, annotations: Path) -> tuple[list[Case], list[tuple[str, str]], list[str], dict[str, str]]:
    """Returns (cases, skipped (case, reason), dataset notes, {seriesuid: split stratum})."""
    root = Path(root)
    nodules, skipped = read_annotations(annotations)
    cases, strata, seen = [], {}, {}
    for path in find_scans(root):
        uid = path.stem
        if uid in seen:
            skipped.append((uid, f"series found twice: {relative(seen[uid], root)} and {relative(path, root)}"))
            continue
        seen[uid] = path
        payload = {
            "path": str(path),
            "nodules": nodules.get(uid, []),
            "annotations": str(annotations),
            "root": str(root),
        }
        cases.append(Case(key=uid, source=relative(path, root), payload=payload))
        strata[uid] = size_bin([n[3] for n in nodules.get(uid, [])])
    duplicated = {uid for uid, _ in skipped if uid in seen}
    cases = [c for c in cases if c.key not in duplicated]
    notes = []
    missing = sorted(set(nodules) - set(seen))
    if missing:
        notes.append(
            f"{sum(len(nodules[u]) for u in missing)} annotations refer to {len(missing)} series not "
            f"under --root (e.g. {missing[0]})"
        )
    return cases, skipped, notes, strata


# ---------------------------------------------------------------------------------------------
# one series
# ---------------------------------------------------------------------------------------------


def check_metaimage(path: str) -> None:
    """Fail early, naming the file, when a MetaImage header or its data file is missing or truncated
    (ITK's own message for a short .raw ends in an unrelated errno text)."""
    header = {}
    try:
        with open(path, encoding="latin-1") as f:
            for line in f:
                key, sep, value = line.partition("=")
                if sep:
                    header[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile":
                    break
    except OSError as e:
        raise CaseError(f"{path}: cannot read header ({e.strerror})") from e
    data = header.get("ElementDataFile")
    if not data or not header.get("DimSize"):
        raise CaseError(f"{path}: not a MetaImage header (no DimSize / ElementDataFile)")
    if data == "LOCAL" or data.startswith("LIST") or "%" in data:
        return
    data_path = Path(path).parent / data
    if not data_path.is_file():
        raise CaseError(f"{data_path}: data file missing (referenced by {path})")
    width = ELEMENT_BYTES.get(header.get("ElementType", ""))
    if header.get("CompressedData", "False").lower() != "true" and width:
        try:
            count = math.prod(int(v) for v in header["DimSize"].split())
            count *= int(header.get("ElementNumberOfChannels", "1"))
        except ValueError as e:
            raise CaseError(f"{path}: bad DimSize {header['DimSize']!r}") from e
        if data_path.stat().st_size < count * width:
            raise CaseError(
                f"{data_path}: truncated ({data_path.stat().st_size} bytes, {count * width} expected "
                f"from {Path(path).name})"
            )


def read_scan(path: str) -> tuple[sitk.Image, np.ndarray]:
    """Read a MetaImage CT; returns (image, int16/float array (z, y, x) in HU). Raises CaseError naming the file."""
    check_metaimage(path)
    try:
        image = sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)
    except Exception as e:  # SimpleITK raises RuntimeError with a long ITK trace
        first = str(e).strip().splitlines()
        raise CaseError(f"{path}: cannot read MetaImage ({first[-1] if first else type(e).__name__})") from e
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(
            f"{path}: expected a 3D scalar volume, got {image.GetDimension()}D "
            f"with {image.GetNumberOfComponentsPerPixel()} components"
        )
    return image, array


def stored_grid(image: sitk.Image, size: int, flips: tuple[bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """Continuous source (row j, col i) index of the centre of each stored row / column, shape (size,) each.

    Canonical orientation: a flipped axis is read backwards, so stored columns run along +x, rows along +y.
    """
    nx, ny, _ = image.GetSize()
    rows, cols = pixel_centres(ny, size), pixel_centres(nx, size)
    if flips[0]:
        cols = (nx - 1) - cols
    if flips[1]:
        rows = (ny - 1) - rows
    return rows, cols


def sphere_mask(
    image: sitk.Image, k: int, rows: np.ndarray, cols: np.ndarray, nodules: Sequence[tuple[float, float, float, float]]
) -> np.ndarray:
    """Stored (len(rows), len(cols)) bool mask of the union of nodule spheres on slice ``k``.

    A stored pixel is inside when the world point of its centre (voxel index (cols[c], rows[r], k))
    lies within diameter / 2 of a nodule centre.
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    jj, ii = np.meshgrid(rows, cols, indexing="ij")
    index = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, float(k))])  # (3, N) as (i, j, k)
    world = origin[:, None] + direction @ (spacing[:, None] * index)  # (3, N) as (x, y, z)
    mask = np.zeros(ii.size, dtype=bool)
    for x, y, z, d in nodules:
        mask |= ((world - np.array([[x], [y], [z]])) ** 2).sum(axis=0) <= (d / 2) ** 2
    return mask.reshape(ii.shape)


def convert_case(case: Case, out: Path, opt: LunaOptions) -> tuple[list[StructureRecord], list[str]]:
    """Convert one CT series; returns (records, notes)."""
    p = case.payload
    path, root = p["path"], p["root"]
    image, volume = read_scan(path)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(np.abs(direction), np.eye(3), atol=1e-3):
        raise CaseError(f"{path}: direction matrix {direction.round(3).tolist()} is not axis-aligned")
    flips = (direction[0, 0] < 0, direction[1, 1] < 0)
    nz, ny, nx = volume.shape
    sx, sy, sz = image.GetSpacing()

    centres = []
    for x, y, z, d in p["nodules"]:
        i, j, k = image.TransformPhysicalPointToContinuousIndex((x, y, z))
        if not (-0.5 <= i < nx - 0.5 and -0.5 <= j < ny - 0.5 and -0.5 <= k < nz - 0.5):
            raise CaseError(
                f"{p['annotations']}: nodule at world ({x:.1f}, {y:.1f}, {z:.1f}) mm maps to voxel "
                f"({i:.1f}, {j:.1f}, {k:.1f}), outside {relative(path, root)} of size {(nx, ny, nz)}"
            )
        centres.append(k)

    positives: set[int] = set()
    for kc, (_, _, _, d) in zip(centres, p["nodules"]):
        nearest = int(round(kc))
        for k in range(nearest - opt.nodule_slices, nearest + opt.nodule_slices + 1):
            if 0 <= k < nz and (k == nearest or abs(k - kc) * sz < d / 2):
                positives.add(k)
    eligible = []
    for k in range(nz):
        if all(abs(k - kc) * sz >= d / 2 + opt.negative_margin for kc, (*_, d) in zip(centres, p["nodules"])):
            hu = volume[k]
            lung = ((hu >= LUNG_HU[0]) & (hu <= LUNG_HU[1])).mean()
            if lung >= opt.min_lung_fraction:
                eligible.append(k)
    rng = case_rng(opt.seed, case.key)
    negatives = sorted(rng.choice(eligible, min(len(eligible), opt.negatives_per_series), replace=False).tolist())

    rows, cols = stored_grid(image, opt.size, flips)
    lo, hi = opt.hu_window
    original_size = (ny, nx)
    spacing = stored_spacing((sy, sx), original_size, opt.size)
    records, notes = [], []
    for k in sorted(positives) + [int(k) for k in negatives]:
        on_slice = [n for kc, n in zip(centres, p["nodules"]) if abs(k - kc) * sz < n[3] / 2]
        mask = sphere_mask(image, k, rows, cols, on_slice) if k in positives else None
        if mask is not None and not mask.any():
            notes.append("slice skipped: its nodules cover no stored pixel centre (too small at this size)")
            continue
        hu = volume[k].astype(np.float32)
        hu = hu[:: -1 if flips[1] else 1, :: -1 if flips[0] else 1]
        scaled = (np.clip(hu, lo, hi) - lo) * (255.0 / (hi - lo))
        sample_id = f"luna_{safe_name(case.key)}_z{k:03d}"
        rel_image, rel_masks = write_sample(
            out,
            sample_id,
            to_uint8(resize_bilinear(scaled, opt.size)),
            {"nodule": mask} if mask is not None else {},
            overwrite=True,
        )
        sizes = sorted((n[3] for n in on_slice), reverse=True)
        prompts = list(PROMPTS)
        if sizes:
            prompts.append(f"{sizes[0]:.0f} mm pulmonary nodule")
            caption = (
                f"chest CT, axial slice, lung window: {len(sizes)} pulmonary nodule"
                f"{'s' if len(sizes) > 1 else ''} ({', '.join(f'{s:.1f} mm' for s in sizes)})"
            )
        else:
            caption = "chest CT, axial slice, lung window: no annotated nodule"
        records.append(
            StructureRecord(
                sample_id=sample_id,
                subject_id=case.key,
                dataset=opt.dataset,
                modality="CT",
                structure="nodule",
                prompts=prompts,
                image=rel_image,
                mask=rel_masks.get("nodule"),
                spacing_mm=spacing,
                original_size=original_size,
                source=f"{relative(path, root)}#z={k}",
                caption=caption,
            )
        )
    if p["nodules"] and not any(r.mask for r in records):
        notes.append("series with nodules but no usable nodule slice")
    return records, notes


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the converter; returns the summary (see convert.run_conversion)."""
    parser = base_parser("freqmedclip.data.converters.luna16", __doc__, "lung")
    parser.add_argument(
        "--annotations", type=Path, default=None, help="annotations.csv (default: the one found under --root)"
    )
    parser.add_argument("--hu-window", type=float, nargs=2, default=(-1350.0, 150.0), metavar=("LO", "HI"))
    parser.add_argument(
        "--nodule-slices",
        type=int,
        default=2,
        help="extra slices on each side of a nodule's centre slice (if they cut the sphere)",
    )
    parser.add_argument("--negatives-per-series", type=int, default=2)
    parser.add_argument(
        "--negative-margin", type=float, default=5.0, help="mm between a negative slice and every nodule's surface"
    )
    parser.add_argument("--min-lung-fraction", type=float, default=0.05)
    args = parse_converter_args(parser, argv)
    annotations = args.annotations
    if annotations is None:
        found = sorted(args.root.rglob("annotations.csv"))
        if not found:
            parser.error(f"no annotations.csv under {args.root}; pass --annotations")
        annotations = found[0]
    if args.hu_window[1] <= args.hu_window[0]:
        parser.error("--hu-window LO HI needs LO < HI")
    opt = LunaOptions(
        dataset=args.dataset_name,
        size=args.size,
        hu_window=tuple(args.hu_window),
        nodule_slices=args.nodule_slices,
        negatives_per_series=args.negatives_per_series,
        negative_margin=args.negative_margin,
        min_lung_fraction=args.min_lung_fraction,
        seed=args.seed,
    )
    cases, skipped, notes, strata = find_cases(args.root, annotations)
    if not cases and not skipped:
        parser.error(f"no subset*/*.mhd under {args.root}")
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
        stratify=lambda r: f"{r.dataset}/{strata.get(r.subject_id, 'no nodule')}",
        skipped=skipped,
        limit=args.limit,
        notes=notes,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
