"""Shared machinery of the converters (BraTS, CBIS-DDSM, LUNA16, the folder importer; DATA.md §1-3, §8).

A converter describes its raw download as a list of independent :class:`Case` objects (one BraTS
case folder, one mammogram, one CT series, one image of an imported folder) plus a picklable function
``convert(case, out, options)`` that writes that case's samples with
:func:`freqmedclip.data.format.write_sample` and returns their StructureRecords. :func:`run_conversion`
does the rest, identically for every dataset:

- cases run in a ``multiprocessing`` pool (``--workers``), one case per task, so memory stays at
  one volume per worker; a tqdm bar counts cases;
- a bad case raises :class:`CaseError` (or any exception); it is reported with the offending file,
  skipped, and listed in the summary while the other cases convert. A case may also leave out some
  of its inputs (e.g. one bad mask of an image with several) and still convert the rest: ``convert``
  then returns the reasons as a third element, ``(records, notes, skipped)``; they are listed with
  the skipped cases, and a case whose every input was left out counts as skipped;
- resumable: when a case finishes without leaving anything out, its records go to
  ``<out>/.convert/<dataset>/<case>.json`` (atomic). A rerun loads finished cases from there and
  converts only the rest (skipped and partly skipped cases are retried), so an interrupted run
  continues where it stopped. Samples are written atomically, so a half-converted case only leaves
  complete PNGs, which the rerun rewrites. A marker written with different options or a different
  case payload, or one listing a sample file that has since disappeared, is stale: its files are
  deleted and the case is converted again;
- the manifest keeps other datasets' records already in ``<out>/manifest.jsonl`` (several
  converters may share one root), splits this dataset's subjects 70/20/10 with
  :func:`~freqmedclip.data.format.assign_splits`, and writes it atomically;
- a summary (samples per split, positive/negative records per split and structure, skipped cases
  and files with reasons, notes, time) is printed and saved as ``<out>/conversion_<dataset>.json``.

Geometry conventions used by every converter (the tests rely on them): a stored pixel (r, c) of an
S x S image covers the source region whose centre is at continuous source index
``((r + 0.5) * H / S - 0.5, (c + 0.5) * W / S - 0.5)``. Masks are resized by nearest neighbour, i.e.
the source pixel containing that centre, ``floor((r + 0.5) * H / S)``; images bilinearly (PIL,
antialiased when shrinking). Spacing of the stored grid = source spacing x source size / S per axis.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from freqmedclip.data.format import StructureRecord, assign_splits, read_manifest, write_manifest

STATE_DIR = ".convert"


class CaseError(Exception):
    """A bad input (missing, corrupt or inconsistent file). The message names the file; the case is skipped."""


@dataclass
class Case:
    """One independent unit of conversion.

    ``key`` is unique and filesystem-safe (it names the resume marker and prefixes sample ids);
    ``source`` is the main input path, quoted when an unexpected exception has no better message;
    ``payload`` is whatever (picklable) the converter needs.
    """

    key: str
    source: str
    payload: Any = None


@dataclass
class CaseResult:
    key: str
    records: list[StructureRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None


# convert(case, out, options) -> (records, notes) or (records, notes, skipped reasons)
ConvertFn = Callable[[Case, Path, Any], tuple]


# ---------------------------------------------------------------------------------------------
# geometry and intensity helpers
# ---------------------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """Filesystem-safe version of an id (keeps letters, digits, '.', '-', '_')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` output pixels under nearest-neighbour resizing, shape (n_out,)."""
    idx = np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def pixel_centres(n_in: int, n_out: int) -> np.ndarray:
    """Continuous source coordinate of the centre of each of ``n_out`` output pixels, shape (n_out,)."""
    return (np.arange(n_out) + 0.5) * n_in / n_out - 0.5


def resize_nearest(array: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (H, W[, ...]) to (size, size[, ...]) or (h, w[, ...]); exact for label maps."""
    h, w = (size, size) if isinstance(size, int) else size
    return array[nearest_indices(array.shape[0], h)][:, nearest_indices(array.shape[1], w)]


def resize_bilinear(array: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float image (H, W) or (H, W, C) to (size, size[, C]) float32."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3:
        return np.stack([resize_bilinear(array[..., c], size) for c in range(array.shape[2])], axis=-1)
    if array.shape == (size, size):
        return array.copy()
    out = Image.fromarray(np.ascontiguousarray(array)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Round values in [0, 255] to uint8 (out-of-range values are clipped)."""
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def stored_spacing(spacing: Sequence[float], original_size: Sequence[int], size: int) -> tuple[float, float]:
    """(row, col) spacing in mm of the stored size x size grid for a source region of (H, W) pixels."""
    return (float(spacing[0]) * original_size[0] / size, float(spacing[1]) * original_size[1] / size)


def case_rng(seed: int, key: str) -> np.random.Generator:
    """Per-case RNG: the same choices for a case whatever the worker count or case order."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def relative(path: Path | str, root: Path | str) -> str:
    """``path`` relative to ``root`` when inside it (the manifest's ``source`` field), else as given."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def base_parser(module: str, description: str, dataset: str, root: bool = True) -> argparse.ArgumentParser:
    """Argument parser with the options every converter shares; converters add their own.

    ``root=False`` leaves out ``--root`` for a converter that names its inputs with its own options."""
    p = argparse.ArgumentParser(
        prog=f"python -m {module}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if root:
        p.add_argument("--root", type=Path, required=True, help="raw download (read only)")
    p.add_argument("--out", type=Path, required=True, help="dataset root to write (created; may be shared)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--size", type=int, default=224, help="stored image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the slice sampling and of the split")
    p.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        default=(0.7, 0.2, 0.1),
        metavar=("TRAIN", "VAL", "TEST"),
        help="subject-level split fractions",
    )
    p.add_argument("--limit", type=int, default=None, help="convert only the first N cases (smoke runs)")
    p.add_argument(
        "--dataset-name",
        "--dataset",
        dest="dataset_name",
        default=dataset,
        help="value of the manifest's `dataset` field",
    )
    return p


# ---------------------------------------------------------------------------------------------
# resumable, parallel conversion
# ---------------------------------------------------------------------------------------------


def parse_converter_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a converter's command line and check that ``--root`` is a directory."""
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a directory")
    return args


_UMASK = os.umask(0o022)
os.umask(_UMASK)   # read once at import (os.umask can only be read by setting it)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` (str as UTF-8) to a temp file next to ``path``, then move it into place: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp creates 0600; a shared --out must stay readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fingerprint(options: Any, version: str, payload: Any = None) -> str:
    """Hash of everything that changes a case's output (converter version, options, case payload)."""
    opts = asdict(options) if is_dataclass(options) else dict(options)
    text = json.dumps({"version": version, "options": opts, "payload": payload}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _run_case(job: tuple[ConvertFn, Case, Path, Any]) -> CaseResult:
    convert, case, out, options = job
    try:
        records, notes, *skipped = convert(case, out, options)
        return CaseResult(case.key, records, notes, skipped=list(skipped[0]) if skipped else [])
    except CaseError as e:
        return CaseResult(case.key, error=str(e))
    except MemoryError:
        return CaseResult(case.key, error=f"{case.source}: out of memory")
    except Exception as e:  # any other failure of one case must not stop the others
        return CaseResult(case.key, error=f"{case.source}: {type(e).__name__}: {e}")


def _load_marker(path: Path, out: Path, fp: str) -> CaseResult | None:
    """The finished result stored at ``path``, or None when it was written with other options, is
    unreadable, or lists a sample file that no longer exists (the case is then converted again)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        records = [StructureRecord.from_dict(r) for r in state["records"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if state.get("fingerprint") != fp:
        return None
    if not all((out / rel).is_file() for r in records for rel in (r.image, r.mask) if rel):
        return None
    return CaseResult(state["key"], records, state.get("notes", []))


def _remove_outputs(path: Path, out: Path) -> None:
    """Delete the sample files listed by a stale marker, then the marker."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        for r in state.get("records", []):
            for rel in (r.get("image"), r.get("mask")):
                if rel:
                    (out / rel).unlink(missing_ok=True)
    except (ValueError, OSError, AttributeError):
        pass
    path.unlink(missing_ok=True)


def run_conversion(
    *,
    dataset: str,
    out: Path,
    cases: Sequence[Case],
    convert: ConvertFn,
    options: Any,
    version: str,
    workers: int = 1,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    stratify: Callable[[StructureRecord], str] | None = None,
    assign: Callable[[list[StructureRecord]], None] | None = None,
    skipped: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
    unit: str = "case",
    limit: int | None = None,
) -> dict:
    """Convert ``cases`` (resuming finished ones), write the manifest and return the summary dict.

    Args:
        dataset: the manifest's ``dataset`` value; records of other datasets in ``out`` are kept.
        cases: work units; their keys must be unique.
        convert: ``convert(case, out, options) -> (records, notes[, skipped])``; a module-level function.
            ``skipped`` lists reasons (naming the file) for inputs of the case that were left out.
        options: picklable options object passed to ``convert`` (part of the resume fingerprint, as
            are the version and each case's payload).
        version: converter version string (part of the resume fingerprint).
        stratify: stratum of a record for :func:`assign_splits` (default: the dataset).
        assign: replaces the default split assignment (fills ``record.split`` in place).
        skipped: (case, reason) pairs already rejected while indexing the raw data.
        notes: dataset-level notes for the summary.
        unit: what one case is, for the progress bar and the summary ("case", "file").
        limit: convert only the first ``limit`` cases (trial runs).
    Returns:
        the summary also saved as ``out/conversion_<dataset>.json``.
    """
    start = time.time()
    if limit is not None:
        cases = cases[:limit]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be 3 non-negative values summing to 1, got {list(fractions)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / STATE_DIR / safe_name(dataset)
    fps = {c.key: fingerprint(options, version, c.payload) for c in cases}
    keys = [c.key for c in cases]
    if len(set(keys)) != len(keys):
        dup = [k for k, n in Counter(keys).items() if n > 1]
        raise ValueError(f"duplicate case keys: {dup[:5]}")

    results: dict[str, CaseResult] = {}
    todo: list[Case] = []
    for case in cases:
        marker = state_dir / f"{safe_name(case.key)}.json"
        if marker.is_file():
            done = _load_marker(marker, out, fps[case.key])
            if done is not None:
                results[case.key] = done
                continue
            _remove_outputs(marker, out)
        todo.append(case)
    resumed = len(results)
    if resumed:
        print(f"[{dataset}] resuming: {resumed} finished cases kept, {len(todo)} to convert")

    errors: list[tuple[str, str]] = list(skipped)

    def collect(res: CaseResult, bar: tqdm) -> None:
        for reason in [res.error] if res.error is not None else res.skipped:
            errors.append((res.key, reason))
            bar.write(f"[{dataset}] skipped {res.key}: {reason}")
        if res.error is None and (res.records or not res.skipped):
            if not res.skipped:  # a partly skipped case is retried by the next run
                marker = state_dir / f"{safe_name(res.key)}.json"
                records = [asdict(r) for r in res.records]
                state = {"key": res.key, "fingerprint": fps[res.key], "notes": res.notes, "records": records}
                atomic_write(marker, json.dumps(state) + "\n")
            results[res.key] = res
        bar.update(1)

    jobs = [(convert, case, out, options) for case in todo]
    with tqdm(total=len(jobs), desc=f"convert {dataset}", unit=unit, dynamic_ncols=True) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                collect(_run_case(job), bar)
        else:
            with multiprocessing.Pool(min(workers, len(jobs))) as pool:
                for res in pool.imap_unordered(_run_case, jobs, chunksize=1):
                    collect(res, bar)

    records = [r for key in keys if key in results for r in results[key].records]
    if assign is not None:
        assign(records)
    elif records:
        assign_splits(records, tuple(fractions), seed=seed, stratify_by=stratify or "dataset")

    kept: list[StructureRecord] = []
    if (out / "manifest.jsonl").is_file():
        kept = [r for r in read_manifest(out) if r.dataset != dataset]
    write_manifest(out, kept + records)

    n_cases = len(cases) + len(skipped)
    summary = _summary(dataset, out, unit, n_cases, results, records, errors, list(notes), resumed, time.time() - start)
    atomic_write(out / f"conversion_{safe_name(dataset)}.json", json.dumps(summary, indent=1) + "\n")
    print(format_summary(summary))
    return summary


def _summary(dataset, out, unit, n_cases, results, records, errors, notes, resumed, seconds) -> dict:
    per_split: dict[str, dict[str, dict[str, int]]] = defaultdict(
        lambda: defaultdict(lambda: {"positive": 0, "negative": 0})
    )
    samples: dict[str, set[str]] = defaultdict(set)
    subjects: dict[str, set[str]] = defaultdict(set)
    for r in records:
        per_split[r.split][r.structure]["positive" if r.mask is not None else "negative"] += 1
        samples[r.split].add(r.sample_id)
        subjects[r.split].add(r.subject_id)
    case_notes: dict[str, set[str]] = defaultdict(set)
    for key, res in results.items():
        for note in res.notes:
            case_notes[note].add(key)
    return {
        "dataset": dataset,
        "out": str(out),
        "unit": unit,
        "cases": n_cases,
        "converted": len(results) - resumed,
        "resumed": resumed,
        "skipped": [{"case": k, "reason": r} for k, r in errors],
        "samples": {s: len(v) for s, v in sorted(samples.items())},
        "subjects": {s: len(v) for s, v in sorted(subjects.items())},
        "records": {s: {k: dict(v) for k, v in sorted(d.items())} for s, d in sorted(per_split.items())},
        "notes": notes
        + [
            f"{note} [{len(keys)} case(s): {', '.join(sorted(keys)[:5])}{', ...' if len(keys) > 5 else ''}]"
            for note, keys in sorted(case_notes.items())
        ],
        "seconds": round(seconds, 1),
    }


def format_summary(summary: dict) -> str:
    """Human-readable version of the summary returned by :func:`run_conversion`."""
    unit = summary["unit"]
    counts = [c for split in summary["records"].values() for c in split.values()]
    positive, negative = sum(c["positive"] for c in counts), sum(c["negative"] for c in counts)
    lines = [
        (
            f"== {summary['dataset']}: {summary['cases']} {unit}s, {summary['converted']} converted, "
            f"{summary['resumed']} resumed, {len(summary['skipped'])} skipped, {summary['seconds']} s =="
        ),
        (
            f"  converted {sum(summary['samples'].values())} images, {positive + negative} records "
            f"({positive} positive, {negative} negative) -> {summary['out']}"
        ),
    ]
    for split, n in summary["samples"].items():
        lines.append(f"  {split:<6} {n:>7} samples from {summary['subjects'][split]} subjects")
        for structure, c in summary["records"][split].items():
            lines.append(f"         {structure:<20} {c['positive']:>7} positive {c['negative']:>7} negative")
    if summary["skipped"]:
        lines.append(f"  skipped {len(summary['skipped'])} {unit}(s):")
        lines += [f"    {s['case']}: {s['reason']}" for s in summary["skipped"]]
    if summary["notes"]:
        lines.append("  notes:")
        lines += [f"    {n}" for n in summary["notes"]]
    return "\n".join(lines)
