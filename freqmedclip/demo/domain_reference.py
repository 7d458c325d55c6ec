"""Build the out-of-distribution reference of :mod:`freqmedclip.inference.domain` from a dataset root.

    python -m freqmedclip.demo.domain_reference --data DIR --out assets/domains/mini-clip-phantoms.safetensors
                                               [--backbone local-dir:assets/backbones/mini-clip] [--per-domain 60]
                                               [--neighbours 200]

The real-data reference: ``--data data/public --out assets/domains/mini-clip-real-public.safetensors
--backbone local-dir:assets/backbones/mini-clip-real --per-domain 1000`` (every image of both splits). (The phantom reference was built before
the k-NN signals with ``--neighbours 0``'s equivalent and is kept so: the distance alone separates there.)

Up to ``--per-domain`` images per dataset from the train split give the feature statistics, the val split the
thresholds (one image per sample id, as stored: 8-bit, / 255, as the demo sees PNG uploads).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from freqmedclip.data.format import load_image, read_manifest
from freqmedclip.inference import load_clip_backbone
from freqmedclip.inference.domain import DomainReference, build_reference
from freqmedclip.inference.preprocess import to_model_input


def main(argv: list[str] | None = None) -> DomainReference:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset root (manifest.jsonl, images/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backbone", default="local-dir:assets/backbones/mini-clip")
    parser.add_argument("--per-domain", type=int, default=60, help="images per domain and split at most")
    parser.add_argument("--neighbours", type=int, default=200,
                        help="training images per domain stored for the k-NN signals (0: distance only)")
    args = parser.parse_args(argv)
    backbone = load_clip_backbone(args.backbone)
    images: dict[str, dict[str, list[Tensor]]] = {"train": {}, "val": {}}
    seen = set()
    for record in read_manifest(args.data):
        if record.sample_id in seen or record.split not in images:
            continue
        seen.add(record.sample_id)
        chosen = images[record.split].setdefault(record.dataset, [])
        if len(chosen) < args.per_domain:
            pixels = load_image(args.data, record)
            chosen.append(to_model_input(pixels.astype(np.float32) / 255.0, 224))
    stacked = {split: {d: torch.cat(v) for d, v in by.items()} for split, by in images.items()}
    counts = {d: len(v) for d, v in stacked["train"].items()}
    reference = build_reference(backbone, stacked["train"], stacked["val"],
                                source=f"{args.data} train {counts}, thresholds from val",
                                neighbours=args.neighbours)
    reference.save(args.out)
    print(f"{args.out}: domains {list(reference.domains)}, threshold {reference.threshold}, "
          f"similarity threshold {reference.similarity_threshold}, pixel threshold {reference.pixel_threshold}")
    return reference


if __name__ == "__main__":
    main()
