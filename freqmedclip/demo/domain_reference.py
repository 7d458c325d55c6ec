"""Build the out-of-distribution reference of :mod:`freqmedclip.inference.domain` from a dataset root, or measure
how often a built one flags the images of a split it was not built from.

    python -m freqmedclip.demo.domain_reference --data DIR --out assets/domains/NAME.safetensors
                                               [--backbone local-dir:assets/backbones/mini-clip-real]
                                               [--per-domain 60] [--neighbours 200]
    python -m freqmedclip.demo.domain_reference --data DIR --out assets/domains/NAME.safetensors --check test

The shipped references, both on the one mini backbone (the demo picks the one that knows the selected models'
training domains):

* real data: ``--data data/public --out assets/domains/mini-clip-real-public.safetensors --per-domain 1000``
  (every image of both splits);
* phantoms: ``--data data/phantoms --out assets/domains/mini-clip-real-phantoms.safetensors``.

Up to ``--per-domain`` images per dataset from the train split give the feature statistics, the val split the
thresholds (one image per sample id, as stored: 8-bit, / 255, as the demo sees PNG uploads). ``--check SPLIT``
loads ``--out`` instead and prints, per dataset, the share of that split's images flagged as outside the training
data (false alarms: every one of them is an image of a training domain), which signal flagged them, and how often
the domain it names is right (``DomainCheck.nearest``, and ``likeliest``, whose threshold the demo uses).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from freqmedclip.data.format import load_image, read_manifest
from freqmedclip.inference import load_clip_backbone
from freqmedclip.inference.domain import DomainReference, build_reference, check_domain
from freqmedclip.inference.preprocess import to_model_input


def split_images(root: Path, splits: set[str], per_domain: int) -> Iterator[tuple[str, str, Tensor]]:
    """(split, dataset, image (1, 3, 224, 224) in [0, 1]) for up to ``per_domain`` images per dataset and split."""
    seen, counts = set(), Counter()
    for record in read_manifest(root):
        if record.sample_id in seen or record.split not in splits or counts[record.split, record.dataset] >= per_domain:
            continue
        seen.add(record.sample_id)
        counts[record.split, record.dataset] += 1
        yield record.split, record.dataset, to_model_input(load_image(root, record).astype(np.float32) / 255.0, 224)


def build(args: argparse.Namespace) -> DomainReference:
    backbone = load_clip_backbone(args.backbone)
    images: dict[str, dict[str, list[Tensor]]] = {"train": {}, "val": {}}
    for split, dataset, image in split_images(args.data, set(images), args.per_domain):
        images[split].setdefault(dataset, []).append(image)
    stacked = {split: {d: torch.cat(v) for d, v in by.items()} for split, by in images.items()}
    counts = {d: len(v) for d, v in stacked["train"].items()}
    reference = build_reference(backbone, stacked["train"], stacked["val"],
                                source=f"{args.data} train {counts}, thresholds from val",
                                neighbours=args.neighbours)
    reference.save(args.out)
    print(f"{args.out}: domains {list(reference.domains)}, threshold {reference.threshold}, "
          f"similarity threshold {reference.similarity_threshold}, pixel threshold {reference.pixel_threshold}")
    return reference


def check(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """{dataset: {"images", "flagged", "rate", "<signal>": count}} for the images of ``args.check``."""
    reference = DomainReference.load(args.out)
    backbone = load_clip_backbone(args.backbone)
    if backbone.weights_sha256 != reference.backbone_sha256:
        raise SystemExit(f"{args.out} was built on another backbone than {args.backbone}")
    report: dict[str, Counter] = {}
    with torch.no_grad():
        for _, dataset, image in split_images(args.data, {args.check}, args.per_domain):
            result = check_domain(backbone, reference, image)      # all its domains, as the demo asks
            counts = report.setdefault(dataset, Counter())
            counts["images"] += 1
            counts["flagged"] += result.outside
            counts.update(result.reasons)
            counts["nearest_right"] += result.nearest == dataset          # the domain the demo names
            counts["likeliest_right"] += result.likeliest == dataset      # the domain whose threshold it uses
    summary = {d: {**c, "rate": c["flagged"] / c["images"]} for d, c in sorted(report.items())}
    for dataset, row in summary.items():
        signals = ", ".join(f"{k} {row[k]}" for k in ("distance", "similarity", "pixels") if row.get(k))
        print(f"{dataset}: {row['flagged']} of {row['images']} {args.check} images flagged ({100 * row['rate']:.1f} %)"
              f"{': ' + signals if signals else ''}; domain right: nearest by statistics {row['nearest_right']}, "
              f"likeliest {row['likeliest_right']}")
    return summary


def main(argv: list[str] | None = None) -> DomainReference | dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset root (manifest.jsonl, images/)")
    parser.add_argument("--out", type=Path, required=True, help="the reference to write (or, with --check, read)")
    parser.add_argument("--backbone", default="local-dir:assets/backbones/mini-clip-real")
    parser.add_argument("--per-domain", type=int, default=60, help="images per domain and split at most")
    parser.add_argument("--neighbours", type=int, default=200,
                        help="training images per domain stored for the k-NN signals (0: distance only)")
    parser.add_argument("--check", metavar="SPLIT", help="measure the false alarms of --out on this split instead")
    args = parser.parse_args(argv)
    return check(args) if args.check else build(args)


if __name__ == "__main__":
    main()
