"""The demo's example images: reading ``examples.json`` for the gallery, and writing its real-data entries.

    python -m freqmedclip.demo.examples --data data/public --out assets/examples

``examples.json`` lists ``{"image", "prompt", "dataset", "modality"}`` per example. The phantom entries are
written by ``python -m freqmedclip.data.phantoms --examples DIR``; the real ones, written here, also carry
``credit`` (source, citation and licence, shown beside the gallery), ``sample_id`` and ``rule`` (how the image was
chosen). An entry without ``credit`` is a synthetic phantom.

Notable choices:
* One real image per dataset, chosen without looking at any model: among the test split's positive records, the
  one whose target area is the median (the lower median for an even count; ties by sample id). A typical case,
  not the easiest, from patients no checkpoint trained or selected on.
* The stored 224x224 PNG is copied byte for byte: the example is exactly what the test split holds.
* Writing keeps the phantom entries (real ones first, so the gallery opens on real scans) and copies the folder's
  licence files beside the images, since BUS-BRA's licence asks for its notice in every copy.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from freqmedclip.data.format import StructureRecord, load_mask, read_manifest
from freqmedclip.inference.domain import caption_for

EXAMPLES_FILE = "examples.json"
# Source, citation and licence of each public dataset's images, for the credit line under the gallery.
CREDITS = {
    "lgg": "LGG segmentation dataset (Buda et al., Comput Biol Med 2019; TCGA-LGG via TCIA), CC BY-NC-SA 4.0",
    "busbra": "BUS-BRA (Gómez-Flores et al., Med Phys 2024), BUS-BRA licence (permissive; its notice: "
              "licenses/BUSBRA_LICENSE.txt beside the images)",
    "lidc": "LIDC-IDRI (Armato et al., Med Phys 2011; via TCIA), CC BY 3.0",
}
RULE = "test split, positive record with the median target area"
LICENCE_FILES = ("LICENSES.md", "licenses/BUSBRA_LICENSE.txt")
PHANTOM_CREDIT = "synthetic phantoms made by freqmedclip.data.phantoms: no patient data"


@dataclass(frozen=True)
class Example:
    """One gallery entry."""

    path: str                        # the image file
    prompt: str
    dataset: str
    modality: str
    credit: str | None = None        # source and licence of a real image; None: a synthetic phantom

    @property
    def real(self) -> bool:
        return self.credit is not None

    @property
    def label(self) -> str:
        """The gallery caption: real or phantom, what it shows, the prompt."""
        if self.real:
            return f"real {caption_for(self.dataset)} ({self.dataset}): {self.prompt}"
        return f"phantom {self.dataset}: {self.prompt}"


def load_examples(directory: Path) -> list[Example]:
    """The entries of ``directory/examples.json``, in its order."""
    entries = json.loads((Path(directory) / EXAMPLES_FILE).read_text())
    return [Example(str(Path(directory) / e["image"]), e["prompt"], e["dataset"], e["modality"], e.get("credit"))
            for e in entries]


def credits_line(examples: list[Example]) -> str:
    """Markdown under the gallery: where each real example comes from and its licence; what the phantoms are."""
    real = [f"{caption_for(e.dataset)} ({e.dataset}): {e.credit}" for e in examples if e.real]
    parts = []
    if real:
        parts.append("**Real examples** (test split, never trained on): " + "; ".join(real) + ".")
    if any(not e.real for e in examples):
        parts.append(f"**Phantom examples**: {PHANTOM_CREDIT}.")
    return " ".join(parts)


def median_area_record(root: Path, records: list[StructureRecord]) -> tuple[StructureRecord, int]:
    """The record whose target area is the (lower) median of ``records`` (ties: by sample id), with its area."""
    if not records:
        raise ValueError("no positive test record to choose an example from")
    areas = sorted((int(load_mask(root, r).sum()), r.sample_id, r) for r in records)
    area, _, record = areas[(len(areas) - 1) // 2]
    return record, area


def write_real_examples(data: Path, out: Path, datasets: tuple[str, ...] = tuple(CREDITS)) -> Path:
    """Copy one test image per dataset of ``data`` to ``out`` and put its entry into ``out/examples.json``
    (replacing earlier entries of these datasets, keeping the phantoms'). Returns the JSON's path."""
    data, out = Path(data), Path(out)
    records = [r for r in read_manifest(data) if r.split == "test" and r.positive and r.dataset in datasets]
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for dataset in datasets:
        record, area = median_area_record(data, [r for r in records if r.dataset == dataset])
        name = f"{dataset}_{record.structure}.png"
        shutil.copyfile(data / record.image, out / name)
        entries.append({"image": name, "prompt": record.prompts[0], "dataset": dataset, "modality": record.modality,
                        "credit": CREDITS[dataset], "sample_id": record.sample_id,
                        "rule": f"{RULE} ({area} px of 224x224)"})
    path = out / EXAMPLES_FILE
    kept = [e for e in json.loads(path.read_text()) if e["dataset"] not in datasets] if path.is_file() else []
    path.write_text(json.dumps(entries + kept, indent=1, ensure_ascii=False) + "\n")
    for licence in LICENCE_FILES:          # the same layout as the data root, which LICENSES.md refers to
        if (data / licence).is_file():
            (out / licence).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data / licence, out / licence)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="converted public data root (manifest.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("assets/examples"))
    args = parser.parse_args(argv)
    path = write_real_examples(args.data, args.out)
    for entry in json.loads(path.read_text()):
        print(f"{entry['image']}: {entry['prompt']!r}, {entry.get('sample_id', 'phantom')}")
    return path


if __name__ == "__main__":
    main()
