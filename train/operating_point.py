"""Choose each method's mask threshold on the validation split: the operating point of the demo and of the test tables.

A mask is ``probability >= threshold``. At 0.5 an ensemble whose members answer readily can paint a target for the
wrong words; a higher threshold leaves more absent targets empty and costs Dice on faint true ones. This sweep
measures both sides on validation, so the threshold is chosen there and the test split is evaluated once with it:

    python -m train.operating_point --data data/public --split val --out results/public/operating_points.json \
        --runs "FreqMedCLIP-mini (3-seed ensemble)=DIR0,DIR1,DIR2" "Frequency only=DIR" ... \
        [--ship "FreqMedCLIP-mini (3-seed ensemble)=assets/public/checkpoints/operating_point.json"]

Per method (one checkpoint or an ensemble, ``NAME=DIR[,DIR...]`` as in ``train.evaluate``) and per threshold of
``--thresholds``:

* **Avg Dice**: mean Dice of the positive records of each dataset's headline structure, averaged over datasets
  (Table 3's "Average Dice"), on the stored mask grid as in ``train.evaluate``;
* **absent empty**: share of the records whose target is absent (other domains, tumour-free) predicted with less
  than 1 % of the image;
* **phrases empty**: the same for every image asked each of :data:`VALIDATION_UNRELATED_PROMPTS`, phrases never
  trained on and disjoint from the test's held-out ones (``train.evaluate.HELD_OUT_UNRELATED_PROMPTS``), so the
  test's phrases stay unseen by every choice.

Rule: the threshold with the highest Avg Dice among those leaving at least ``--min-empty`` of both kinds empty; if
none does, the one with the largest smaller share (then Dice). Ties go to the threshold nearest 0.5. Each
checkpoint's maps are computed once, so a seed and the ensemble it belongs to share the work; every image runs
once per checkpoint with all its prompts in one batch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freqmedclip.data.dataset import SegmentationDataset
from freqmedclip.data.format import load_mask
from freqmedclip.inference.checkpoint import (OPERATING_POINT_FILE, atomic_write, code_version, load_ensemble,
                                              read_checkpoint_header)
from freqmedclip.inference.predictor import Predictor
from freqmedclip.inference.preprocess import resize_to
from freqmedclip.modeling.backbone import ClipBackbone
from train.evaluate import NEGATIVE_AREA, headline_structures, markdown_table, parse_methods

# Never used in training and not the test's held-out phrases (a test keeps the three sets disjoint).
VALIDATION_UNRELATED_PROMPTS = ("a sailing boat", "thyroid gland", "a bunch of grapes", "a mountain lake",
                                "appendix", "a grand piano")
DEFAULT_THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))    # 0.30, 0.35, ..., 0.90
MIN_EMPTY = 0.95
RULE = ("highest Avg Dice among the thresholds leaving >= min_empty of the absent records and of the (image, "
        "unrelated phrase) pairs empty (< 1 % of the image); if none does, the largest smaller share, then Dice; "
        "ties to the threshold nearest 0.5")


@dataclass(frozen=True)
class SweepPoint:
    """One threshold's validation numbers for one method."""

    threshold: float
    dice: dict[str, float]      # dataset -> mean Dice of its headline structure's positive records
    avg_dice: float
    absent_empty: float         # share of gt-empty records predicted < NEGATIVE_AREA
    phrases_empty: float        # share of (image, validation phrase) pairs predicted < NEGATIVE_AREA

    @property
    def worst_empty(self) -> float:
        return min(self.absent_empty, self.phrases_empty)


@dataclass
class CheckpointMaps:
    """One checkpoint's probabilities on the split at 224: per record (R, 224, 224) and per image and validation
    phrase (I, P, 224, 224), float16 to keep a 600-image split in memory."""

    records: torch.Tensor
    phrases: torch.Tensor


def images_of(dataset: SegmentationDataset) -> dict[str, list[int]]:
    """Stored image -> indices of its records, in manifest order."""
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(dataset.records):
        groups.setdefault(record.image, []).append(index)
    return groups


def checkpoint_maps(checkpoint: Path, dataset: SegmentationDataset, device: torch.device, dtype: str,
                    backbones: dict[str, ClipBackbone]) -> CheckpointMaps:
    """Every record's and every (image, validation phrase) probability map of one checkpoint."""
    cached = backbones.get(read_checkpoint_header(checkpoint)["backbone"]["sha256"])
    models = load_ensemble([checkpoint], backbone=cached, device=device)
    backbones.setdefault(models[0].backbone_sha256, models[0].clip_backbone)
    predictor = Predictor(models, device=str(device), dtype=dtype)
    groups = images_of(dataset)
    records = torch.empty(len(dataset), 224, 224, dtype=torch.float16)
    phrases = torch.empty(len(groups), len(VALIDATION_UNRELATED_PROMPTS), 224, 224, dtype=torch.float16)
    for row, indices in enumerate(groups.values()):
        prompts = [dataset[i]["prompt"] for i in indices]
        image = dataset[indices[0]]["image"][None].to(device)                          # (1, 3, 224, 224)
        with torch.no_grad():
            probability = predictor.predict_tensor(image, [*prompts, *VALIDATION_UNRELATED_PROMPTS])["probability"]
        probability = probability[:, 0].cpu().half()                                   # (R_i + P, 224, 224)
        records[indices] = probability[:len(indices)]
        phrases[row] = probability[len(indices):]
    return CheckpointMaps(records, phrases)


def sweep(maps: Sequence[CheckpointMaps], dataset: SegmentationDataset, headline: dict[str, str],
          thresholds: Sequence[float]) -> list[SweepPoint]:
    """The validation numbers of the ensemble of ``maps`` (probabilities averaged) at every threshold."""
    thresholds = torch.tensor(list(thresholds))[:, None, None]                        # (T, 1, 1)
    dice: dict[str, list[torch.Tensor]] = {d: [] for d in headline}
    absent = []
    for index, record in enumerate(dataset.records):
        probability = torch.stack([m.records[index].float() for m in maps]).mean(0)    # (224, 224)
        gt = load_mask(dataset.root, record)                                          # (H, W) bool, stored grid
        if probability.shape != gt.shape:
            probability = resize_to(probability[None, None], gt.shape)[0, 0]
        masks = probability[None] >= thresholds                                       # (T, H, W)
        if not gt.any():
            absent.append(masks.float().mean((1, 2)) < NEGATIVE_AREA)
        elif headline.get(record.dataset) == record.structure:
            target = torch.from_numpy(gt)
            overlap = (masks & target).sum((1, 2)).float()
            dice[record.dataset].append(2 * overlap / (masks.sum((1, 2)) + target.sum()).float())
    phrases = torch.stack([m.phrases.float() for m in maps]).mean(0)                  # (I, P, 224, 224)
    phrase_areas = torch.stack([(phrases >= t).float().mean((2, 3)).flatten() for t in thresholds[:, 0, 0]])
    phrases_empty = (phrase_areas < NEGATIVE_AREA).float().mean(1)                     # (T,)
    absent_empty = torch.stack(absent).float().mean(0) if absent else torch.ones(len(thresholds))
    points = []
    for t, threshold in enumerate(thresholds[:, 0, 0].tolist()):
        per_dataset = {d: float(torch.stack(v)[:, t].mean()) for d, v in dice.items() if v}
        points.append(SweepPoint(round(threshold, 4), per_dataset, statistics.fmean(per_dataset.values()),
                                 float(absent_empty[t]), float(phrases_empty[t])))
    return points


def choose(points: Sequence[SweepPoint], min_empty: float = MIN_EMPTY) -> tuple[SweepPoint, bool]:
    """The operating point of :data:`RULE`, and whether it leaves at least ``min_empty`` of both kinds empty."""
    meeting = [p for p in points if p.worst_empty >= min_empty]
    if meeting:
        return max(meeting, key=lambda p: (p.avg_dice, -abs(p.threshold - 0.5))), True
    return max(points, key=lambda p: (p.worst_empty, p.avg_dice, -abs(p.threshold - 0.5))), False


def sweep_table(name: str, points: Sequence[SweepPoint], chosen: SweepPoint) -> str:
    datasets = list(points[0].dice)
    header = ["threshold", *(f"{d} Dice" for d in datasets), "Avg Dice", "absent empty", "phrases empty"]
    body = [[f"**{p.threshold:g}**" if p is chosen else f"{p.threshold:g}", *(f"{p.dice[d]:.3f}" for d in datasets),
             f"{p.avg_dice:.3f}", f"{p.absent_empty:.3f}", f"{p.phrases_empty:.3f}"] for p in points]
    return f"### {name}\n\n" + markdown_table(header, body)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR[,DIR...]",
                        help="methods, as train.evaluate's --runs (ensembles allowed)")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (freqmedclip.data.format)")
    parser.add_argument("--split", default="val", help="never the split the tables report")
    parser.add_argument("--out", type=Path, required=True, help="JSON with every method's sweep and choice")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    parser.add_argument("--min-empty", type=float, default=MIN_EMPTY)
    parser.add_argument("--ship", nargs="*", default=[], metavar="NAME=FILE",
                        help=f"also write NAME's operating point to FILE (a model set's {OPERATING_POINT_FILE})")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.set_defaults(checkpoint=None)                     # train.evaluate.parse_methods reads --checkpoint too
    args = parser.parse_args(argv)
    if any(not 0 < t < 1 for t in args.thresholds):
        parser.error(f"--thresholds must lie strictly between 0 and 1, got {args.thresholds}")
    if args.split == "test":
        parser.error("the operating point is chosen on validation; --split test would tune on the reported split")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    methods = parse_methods(args)
    ships = {}
    for spec in args.ship:
        name, sep, path = spec.partition("=")
        if not sep or name not in {m.name for m in methods}:
            raise SystemExit(f"--ship expects NAME=FILE with NAME one of {[m.name for m in methods]}, got {spec!r}")
        ships[name] = Path(path)
    dataset = SegmentationDataset(args.data, args.split, train=False)
    headline = headline_structures(dataset.records, [])

    backbones: dict[str, ClipBackbone] = {}
    cache: dict[Path, CheckpointMaps] = {}
    result: dict[str, Any] = {
        "data": str(args.data), "split": args.split, "rule": RULE, "min_empty": args.min_empty,
        "max_area_fraction": NEGATIVE_AREA, "unrelated_prompts": list(VALIDATION_UNRELATED_PROMPTS),
        "table_structures": headline, "code_version": code_version(),
        "command": shlex.join(["python", "-m", "train.operating_point", *(argv if argv is not None else sys.argv[1:])]),
        "methods": {},
    }
    tables = []
    for method in methods:
        for checkpoint in method.checkpoints:
            if checkpoint not in cache:
                cache[checkpoint] = checkpoint_maps(checkpoint, dataset, device, args.dtype, backbones)
        points = sweep([cache[c] for c in method.checkpoints], dataset, headline, args.thresholds)
        chosen, met = choose(points, args.min_empty)
        result["methods"][method.name] = {"checkpoints": [str(c) for c in method.checkpoints],
                                          "threshold": chosen.threshold, "meets_min_empty": met,
                                          "chosen": asdict(chosen), "sweep": [asdict(p) for p in points]}
        tables.append(sweep_table(method.name, points, chosen))
        print(f"{method.name}: threshold {chosen.threshold:g} (Avg Dice {chosen.avg_dice:.3f}, absent empty "
              f"{chosen.absent_empty:.3f}, phrases empty {chosen.phrases_empty:.3f}"
              f"{'' if met else f', below {args.min_empty:g}'})", flush=True)
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text("\n".join(tables)))
    for name, path in ships.items():
        entry = result["methods"][name]
        shipped = {"threshold": entry["threshold"], "meets_min_empty": entry["meets_min_empty"],
                   "validation": entry["chosen"], "checkpoints": entry["checkpoints"],
                   **{k: result[k] for k in ("data", "split", "rule", "min_empty", "command", "code_version")}}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(shipped, indent=2)))
    print("\n".join(tables))
    return result


if __name__ == "__main__":
    main()
