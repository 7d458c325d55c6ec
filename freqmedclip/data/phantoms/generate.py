"""Phantom benchmark: three synthetic domains mirroring the paper's datasets (paper §4, Table 1).

``python -m freqmedclip.data.phantoms --out DIR [--n-subjects N] [--seed S] [--examples DIR]``

Brain MRI (BraTS-like glioma regions), mammography ROI crops (CBIS-DDSM-like masses) and lung CT
slices (LUNA16-like nodules), written in the shared on-disk format (``format.py``) at 224x224.
It is an offline, seconds-to-generate stand-in for the real datasets: it exercises the whole
pipeline, and its difficulty comes from what the paper argues the frequency stream is for: thin
rims, spicules, small nodules, low contrast, bias field and noise (boundaries), and strong edges
that are not the target (semantics).

Notable choices:
- ``--n-subjects`` is per domain; each subject gives 4 slices/views, so the default (60) writes
  720 images. Splits are 70/20/10 at subject level, stratified by domain.
- Every (image, structure) pair is a record: the domain's own structures (negative when absent,
  including tumour-free slices of tumour subjects) plus one structure of each other domain as a
  cross-domain negative ("breast mass" on a brain MRI), so the text has to matter.
- Subject k of domain d uses ``np.random.default_rng([seed, d, k])``: the output is byte-identical
  for a seed regardless of ``--workers``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from freqmedclip.data.phantoms import brain as phantom_brain, breast as phantom_breast, lung as phantom_lung
from freqmedclip.data.format import StructureRecord, assign_splits, load_mask, write_manifest, write_sample

DOMAINS = (phantom_brain, phantom_breast, phantom_lung)  # position = domain code in the RNG seed
DEFAULT_SUBJECTS = 60
PARAMS_FILE = "phantoms.json"
VERSION = 1
EXAMPLE_MAX_BYTES = 55_000


def subject_records(root: Path, domain: int, subject: int, seed: int, overwrite: bool) -> list[StructureRecord]:
    """Render one subject of one domain, write its files and return its records."""
    module = DOMAINS[domain]
    rng = np.random.default_rng([seed, domain, subject])
    views = module.render_subject(rng)
    subject_id = f"{module.DATASET}_{subject:04d}"
    others = [m for i, m in enumerate(DOMAINS) if i != domain]
    records = []
    for view in views:
        sample_id = f"{subject_id}_{view.view}"
        image, masks = write_sample(root, sample_id, view.image, view.masks, overwrite=overwrite)
        common = dict(
            sample_id=sample_id,
            subject_id=subject_id,
            dataset=module.DATASET,
            modality=module.MODALITY,
            image=image,
            spacing_mm=module.SPACING_MM,
            original_size=module.ORIGINAL_SIZE,
            source="",
            caption=view.caption,
        )
        for structure, prompts in module.STRUCTURES.items():
            extra = view.descriptors.get(structure, []) if structure in masks else []
            records.append(
                StructureRecord(structure=structure, prompts=[*prompts, *extra], mask=masks.get(structure), **common)
            )
        for other in others:
            names = list(other.STRUCTURES)
            structure = names[int(rng.integers(0, len(names)))]
            records.append(
                StructureRecord(structure=structure, prompts=list(other.STRUCTURES[structure]), mask=None, **common)
            )
    return records


def _run_task(task: tuple) -> list[StructureRecord]:
    return subject_records(*task)


def generate(out: Path, n_subjects: int = DEFAULT_SUBJECTS, seed: int = 0, workers: int = 1) -> list[StructureRecord]:
    """Write the phantom benchmark to ``out`` and return its records (splits assigned).

    Files from an earlier run with the same parameters are kept (resume); any other earlier run
    is overwritten file by file.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = {"version": VERSION, "seed": seed, "n_subjects": n_subjects}
    params_path = out / PARAMS_FILE
    overwrite = not (params_path.is_file() and json.loads(params_path.read_text()) == params)
    if overwrite:
        # Until this run completes, the folder holds a mix of two runs: it must not look finished for either.
        params_path.unlink(missing_ok=True)
    tasks = [(out, d, k, seed, overwrite) for d in range(len(DOMAINS)) for k in range(n_subjects)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            chunks = list(pool.map(_run_task, tasks, chunksize=max(1, len(tasks) // (8 * workers))))
    else:
        chunks = [_run_task(t) for t in tasks]
    records = [r for chunk in chunks for r in chunk]
    assign_splits(records, seed=seed, stratify_by="dataset")
    write_manifest(out, records)
    tmp = params_path.with_name(f".{PARAMS_FILE}.tmp")
    tmp.write_text(json.dumps(params) + "\n")
    os.replace(tmp, params_path)  # written last: its presence means every file of this run is complete
    return records


def summarise(records: list[StructureRecord]) -> str:
    """Counts per split x dataset (images, positive and negative records) and per structure."""
    lines = [f"{'split':<6} {'dataset':<8} {'subjects':>8} {'images':>7} {'positive':>9} {'negative':>9}"]
    for split in ("train", "val", "test"):
        for dataset in sorted({r.dataset for r in records}):
            rs = [r for r in records if r.split == split and r.dataset == dataset]
            pos, subjects, images = (
                sum(r.positive for r in rs),
                len({r.subject_id for r in rs}),
                len({r.sample_id for r in rs}),
            )
            lines.append(f"{split:<6} {dataset:<8} {subjects:>8} {images:>7} {pos:>9} {len(rs) - pos:>9}")
    pos = Counter(r.structure for r in records if r.positive)
    neg = Counter(r.structure for r in records if not r.positive)
    lines.append(f"{'structure':<17} {'positive':>9} {'negative':>9}")
    for structure in sorted(pos | neg):
        lines.append(f"{structure:<17} {pos[structure]:>9} {neg[structure]:>9}")
    lines.append(f"total: {len({r.sample_id for r in records})} images, {len(records)} records")
    return "\n".join(lines)


def write_examples(root: Path, records: list[StructureRecord], examples: Path) -> Path:
    """Copy one positive test image per domain to ``examples`` and write ``examples.json``
    ([{"image", "prompt", "dataset", "modality"}]), for the demo: the test image with the largest
    target among files small enough to ship in the repository."""
    examples = Path(examples)
    examples.mkdir(parents=True, exist_ok=True)
    entries = []
    for module in DOMAINS:
        structure = next(iter(module.STRUCTURES))
        candidates = [
            r
            for r in records
            if r.dataset == module.DATASET
            and r.structure == structure
            and r.positive
            and os.path.getsize(Path(root) / r.image) <= EXAMPLE_MAX_BYTES
        ]
        if not candidates:
            raise RuntimeError(f"no {module.DATASET} example image under {EXAMPLE_MAX_BYTES} bytes")
        rec = min(candidates, key=lambda r: (r.split != "test", -int(load_mask(root, r).sum()), r.sample_id))
        name = f"{module.DATASET}_{structure}.png"
        shutil.copyfile(Path(root) / rec.image, examples / name)
        entries.append({"image": name, "prompt": rec.prompts[0], "dataset": rec.dataset, "modality": rec.modality})
    path = examples / "examples.json"
    # real examples (they carry a "credit") are written by freqmedclip.demo.examples: keep them, first
    kept = [e for e in json.loads(path.read_text()) if "credit" in e] if path.is_file() else []
    path.write_text(json.dumps(kept + entries, indent=1, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write")
    parser.add_argument("--n-subjects", type=int, default=DEFAULT_SUBJECTS, help="subjects per domain (4 images each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--examples", type=Path, default=None, help="also write one demo image per domain + examples.json here"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    records = generate(args.out, args.n_subjects, args.seed, args.workers)
    elapsed = time.perf_counter() - start
    print(summarise(records))
    print(f"generated in {elapsed:.1f} s with {args.workers} worker(s) -> {args.out}")
    if args.examples is not None:
        print(f"examples: {write_examples(args.out, records, args.examples)}")


if __name__ == "__main__":
    main()
