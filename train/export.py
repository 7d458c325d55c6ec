"""Publish a trained checkpoint for shipping: weights stored in a smaller dtype, checked against the original.

    python -m train.export runs/mini-seed0 assets/phantom/checkpoints/mini-seed0 --data data/phantoms

Reads ``SOURCE`` (a checkpoint, or a run directory's ``best/``), writes ``DEST`` atomically with its trainable
weights in ``--dtype`` (float16 by default: half the size), then predicts every record of ``--split`` with both
and records in the checkpoint's metadata how much the masks moved: the smallest Dice between an original and a
published mask, and the largest change of any record's Dice against its ground truth. Fails, leaving ``DEST``
untouched, when that change exceeds ``--max-dice-change`` or a mask's Dice to its original falls below
``--min-mask-dice``. The run's ``metrics.jsonl`` and ``curves.png``
(training history) are copied along when present.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from freqmedclip.evaluation import metrics
from freqmedclip.inference.checkpoint import load_checkpoint, read_checkpoint_header, save_checkpoint
from freqmedclip.data.dataset import SegmentationDataset
from freqmedclip.data.format import read_manifest
from freqmedclip.data.phantoms import brain, breast, lung
from freqmedclip.data.public.common import LICENCES
from freqmedclip.modeling.model import FreqMedCLIP
from train.evaluate import resolve_checkpoint
from train.state import publishing, recover

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PHANTOM_DATASETS = {module.DATASET for module in (brain, breast, lung)}
PHANTOM_LICENCE = "synthetic phantoms made by freqmedclip.data.phantoms (no patient data, no third-party terms)"
RUN_FILES = ("metrics.jsonl", "curves.png")


@torch.no_grad()
def compare_masks(original: FreqMedCLIP, published: FreqMedCLIP, dataset: SegmentationDataset, split: str,
                  batch_size: int = 8) -> dict[str, Any]:
    """Thresholded fused masks (logit > 0) of both models on every record of ``dataset``, compared."""
    original.eval()
    published.eval()
    agreement, changes = [], []
    for batch in DataLoader(dataset, batch_size):
        masks = [(m(batch["image"], batch["prompt"]).logits > 0)[:, 0].numpy() for m in (original, published)]
        for before, after, gt in zip(*masks, batch["mask"][:, 0].numpy() > 0.5):
            agreement.append(metrics.dice(before, after))
            changes.append(abs(metrics.dice(before, gt) - metrics.dice(after, gt)))
    return {"split": split, "records": len(changes), "min_mask_dice_vs_original": min(agreement),
            "max_abs_dice_change": max(changes), "mean_abs_dice_change": sum(changes) / len(changes),
            "records_changed": sum(a < 1.0 for a in agreement)}


def training_data_licences(data: Path) -> dict[str, Any]:
    """The datasets of ``data``'s train split (all its records when it has none) and the licence of each."""
    records = read_manifest(data)
    datasets = sorted({r.dataset for r in records if r.split == "train"} or {r.dataset for r in records})
    return {"root": str(data), "datasets": datasets,
            "licences": {d: LICENCES.get(d, PHANTOM_LICENCE if d in PHANTOM_DATASETS else "not recorded")
                         for d in datasets}}


def export(source: Path, dest: Path, data: Path, split: str = "test", dtype: str = "fp16",
           max_dice_change: float = 0.005, min_mask_dice: float = 0.95, command: str = "") -> dict[str, Any]:
    """Write ``source`` to ``dest`` in ``dtype`` and return the check recorded in its metadata."""
    recover(Path(dest))
    source = resolve_checkpoint(Path(source))
    original = load_checkpoint(source)
    metadata = dict(read_checkpoint_header(source)["metadata"])
    dataset = SegmentationDataset(data, split, train=False)
    with publishing(Path(dest)) as tmp:
        save_checkpoint(tmp, original, metadata, dtype=DTYPES[dtype])
        published = load_checkpoint(tmp, backbone=original.clip_backbone)
        check = compare_masks(original, published, dataset, split)
        if check["max_abs_dice_change"] > max_dice_change or check["min_mask_dice_vs_original"] < min_mask_dice:
            raise SystemExit(f"{dtype} changes a mask's Dice by up to {check['max_abs_dice_change']:.4f} (limit "
                             f"{max_dice_change}) and leaves a mask with Dice {check['min_mask_dice_vs_original']:.4f} "
                             f"to its original (limit {min_mask_dice}) on {split}; {dest} left unchanged (try --dtype "
                             f"fp32)")
        metadata["export"] = {"source": str(source), "dtype": dtype, "command": command, "check": check}
        trained_on = Path(metadata.get("args", {}).get("data", data))     # the run's own data root, when known
        metadata["training_data"] = training_data_licences(trained_on if (trained_on / "manifest.jsonl").is_file()
                                                           else data)
        save_checkpoint(tmp, published, metadata, dtype=DTYPES[dtype])
        for name in RUN_FILES:
            if (source.parent / name).is_file():
                shutil.copyfile(source.parent / name, tmp / name)
    return check


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="checkpoint directory or training run directory (uses best/)")
    parser.add_argument("dest", type=Path, help="published checkpoint directory (replaced atomically)")
    parser.add_argument("--data", type=Path, required=True, help="dataset root for the mask check")
    parser.add_argument("--split", default="test", help="records on which the masks are compared")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--max-dice-change", type=float, default=0.005,
                        help="largest allowed change of a record's Dice against its ground truth")
    parser.add_argument("--min-mask-dice", type=float, default=0.95,
                        help="smallest allowed Dice between a mask and its original (catches changed false alarms, "
                             "which score Dice 0 against an empty target either way)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m train.export", *(argv if argv is not None else sys.argv[1:])])
    check = export(args.source, args.dest, args.data, args.split, args.dtype, args.max_dice_change,
                   args.min_mask_dice, command)
    print(f"{args.dest}: {args.dtype}, {check['records']} {check['split']} records, masks changed in "
          f"{check['records_changed']}, max |dDice| {check['max_abs_dice_change']:.5f}, "
          f"min Dice(original, published) {check['min_mask_dice_vs_original']:.5f}")
    return check


if __name__ == "__main__":
    main()
