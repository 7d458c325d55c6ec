"""Get the pinned public scans and convert them into the on-disk format (``python -m freqmedclip.data.public``).

``python -m freqmedclip.data.public --out data/public [--mirror DIR | --cache DIR] [--sources brain breast lung]
[--workers N] [--seed S] [--limit N]``

Writes one dataset root with three datasets (``lgg`` brain MRI, ``busbra`` breast ultrasound, ``lidc`` lung CT
crops; see ``brain.py``, ``breast.py``, ``lung.py``), their patient-level 70/20/10 splits, the runner's summary per
dataset (``conversion_<dataset>.json``), an overall ``conversion_public.json`` and ``LICENSES.md``.

Notable choices:
- Files come from ``--mirror`` (a folder of ``<owner>+<repo>/<path>``), else from the download cache
  (``--cache``, default ``<out>/.download``), filled from raw.githubusercontent.com at the pinned commits
  of ``lock.tsv``. Without network and without a mirror the command stops with one message.
- Every file is checked against the lock (size, sha256) before it is decoded. A missing, changed,
  truncated or undecodable file, or a mask of the wrong size, skips its image with a message naming the
  file; the rest converts, the summary lists it, and the exit status is 1.
- Conversion runs on the converters' shared runner: parallel, progress bar, resumable (a rerun keeps
  finished images and retries the skipped ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from freqmedclip.data.converters.runner import CaseError, atomic_write, run_conversion
from freqmedclip.data.public import brain, breast, lung
from freqmedclip.data.public.common import DATASET, PublicOptions
from freqmedclip.data.public.fetch import (
    LOCK,
    LockedFile,
    NoNetwork,
    fetch,
    no_network_message,
    read_lock,
    read_verified,
)

SOURCES = ("brain", "breast", "lung")
MODULES = {"brain": brain, "breast": breast, "lung": lung}
UNITS = {"brain": "slice", "breast": "image", "lung": "crop"}
CONVERTED_SUFFIXES = (".png", ".tif")

LICENSES = """# Licences and citations of the public data in this folder

Carry this file with any copy of this folder or data derived from it, and name these licences where weights
trained on these data are published.

- **Brain** (`lgg`): the LGG dataset (Buda et al.; Kaggle "mateuszbuda/lgg-mri-segmentation") is listed as
  **CC BY-NC-SA 4.0**: non-commercial, share-alike. Images from TCGA-LGG via TCIA. Cite: Buda M, Saha A,
  Mazurowski MA, *Comput Biol Med* 2019;109:218-225; Mazurowski MA et al., *J Neurooncol* 2017;133(1):27-35.
  Treat weights trained on these data as non-commercial, under the same licence notice and attribution
  (we are not lawyers).
- **Breast** (`busbra`): BUS-BRA's own licence (`licenses/BUSBRA_LICENSE.txt`, permissive, MIT-style) requires keeping
  the notice and citing Gómez-Flores W, Gregorio-Calas MJ, Pereira WCA, "BUS-BRA: A Breast Ultrasound Dataset for
  Assessing Computer-aided Diagnosis Systems", *Medical Physics* 2024;51(4):3110-3123.
- **Lung** (`lidc`): LIDC-IDRI is **CC BY 3.0** (TCIA). Cite: Armato SG III et al., *Med Phys* 2011;38(2):915-931,
  and the TCIA collection, doi:10.7937/K9/TCIA.2015.LO9QL9SX.
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m freqmedclip.data.public",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write (created; may be shared)")
    parser.add_argument("--mirror", type=Path, default=None, help="local copy of the files as <owner>+<repo>/<path>")
    parser.add_argument("--cache", type=Path, default=None, help="download folder (default: <out>/.download)")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES), help="domains to convert")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.2, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--limit", type=int, default=None, help="convert only N images per source (smoke runs)")
    parser.add_argument("--lock", type=Path, default=LOCK, help="lock file (default: the one in the package)")
    args = parser.parse_args(argv)
    if args.mirror is not None and not args.mirror.is_dir():
        parser.error(f"--mirror {args.mirror} is not a directory")
    return args


def _stratum(domain: str):
    """Split stratum of a record: brain by TCGA grade code, breast by pathology, lung by nodule size."""
    if domain == "brain":
        return lambda r: f"lgg/grade {r.metadata.get('tcga_clinical_codes', {}).get('neoplasm_histologic_grade', '?')}"
    if domain == "breast":
        return lambda r: f"busbra/{r.metadata.get('pathology', '?')}"
    return lambda r: f"lidc/{r.metadata.get('size_bin', '?')}"


def _documents(entries: Sequence[LockedFile], locate) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    """Verified bytes of the pinned non-image files (CSV tables, licences); (file, reason) for bad ones."""
    good, bad = {}, []
    for e in entries:
        if e.path.lower().endswith(CONVERTED_SUFFIXES):
            continue
        try:
            good[e.path] = read_verified(locate(e), e)
        except CaseError as err:
            bad.append((e.key, str(err)))
    return good, bad


def convert_source(domain: str, entries: Sequence[LockedFile], locate, args: argparse.Namespace) -> dict:
    """Convert one domain on the shared runner; returns the runner's summary."""
    module = MODULES[domain]
    docs, skipped = _documents(entries, locate)
    if domain == "brain":
        clinical = brain.read_clinical(docs[brain.CLINICAL_CSV]) if brain.CLINICAL_CSV in docs else {}
        cases, unpaired = brain.find_cases(entries, locate, clinical)
    elif domain == "breast":
        if breast.TABLE_CSV in docs:
            cases, unpaired = breast.find_cases(entries, locate, breast.read_table(docs[breast.TABLE_CSV]))
        else:  # without the table there is no patient id, hence no safe split
            cases, unpaired = [], [("BUSBRA", f"no usable {breast.TABLE_CSV}: the breast images were not converted")]
        if breast.LICENSE in docs:
            atomic_write(Path(args.out) / "licenses" / "BUSBRA_LICENSE.txt", docs[breast.LICENSE])
    else:
        cases, unpaired = lung.find_cases(entries, locate)
    options = PublicOptions(domain=domain, dataset=DATASET[domain], source_spacing_mm=module.ASSUMED_SPACING_MM)
    return run_conversion(
        dataset=options.dataset,
        out=args.out,
        cases=cases,
        convert=module.convert_case,
        options=options,
        version=module.VERSION,
        workers=args.workers,
        seed=args.seed,
        fractions=args.fractions,
        stratify=_stratum(domain),
        skipped=skipped + unpaired,
        notes=[f"spacing assumed: {module.ASSUMED_SPACING_MM} mm per source pixel (the source records none)"],
        unit=UNITS[domain],
        limit=args.limit,
    )


def overview(summaries: dict[str, dict]) -> dict:
    """Per domain: images and subjects per split, skipped inputs, and (lung) crops left out for no consensus."""
    table = {}
    for domain, s in summaries.items():
        images = sum(s["samples"].values())
        table[domain] = {
            "dataset": s["dataset"],
            "images": dict(s["samples"]),
            "subjects": dict(s["subjects"]),
            "skipped": len(s["skipped"]),
            # finished cases that wrote no image: the lung crops without a 50 % consensus
            "left_out": s["converted"] + s["resumed"] - images,
        }
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Fetch, verify and convert; returns the exit status (0, or 1 when a pinned file was missing or bad)."""
    args = parse_args(argv)
    entries = [e for e in read_lock(args.lock) if e.domain in args.sources]
    download_failures: dict[str, str] = {}
    if args.mirror is not None:
        root = args.mirror
    else:
        root = args.cache or Path(args.out) / ".download"
        try:
            download_failures = fetch(entries, root)
        except NoNetwork as e:
            raise SystemExit(no_network_message(str(e), entries)) from None
    locate = lambda e: root / e.key  # noqa: E731
    summaries = {}
    for domain in args.sources:
        summaries[domain] = convert_source(domain, [e for e in entries if e.domain == domain], locate, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.out) / "LICENSES.md", LICENSES.encode())
    table = overview(summaries)
    bad = sum(t["skipped"] for t in table.values()) + len(download_failures)
    report = {"sources": table, "download_failures": download_failures, "exit_status": int(bad > 0)}
    atomic_write(Path(args.out) / "conversion_public.json", (json.dumps(report, indent=1) + "\n").encode())
    print("\n== public data ==")
    for domain, t in table.items():
        splits = ", ".join(f"{k} {v} ({t['subjects'][k]} patients)" for k, v in t["images"].items())
        left = f", {t['left_out']} left out (no consensus)" if t["left_out"] else ""
        total = sum(t["images"].values())
        print(f"  {domain:<6} {t['dataset']:<7} {total} images: {splits}; {t['skipped']} skipped{left}")
    for key, reason in download_failures.items():
        print(f"  download failed: {key}: {reason}", file=sys.stderr)
    if bad:
        print(f"  {bad} pinned file(s) missing or bad: see the skipped lists above", file=sys.stderr)
    return report["exit_status"]

