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

``--per-domain`` also chooses one threshold per domain (the dataset of the image: its headline structure's Dice,
its own absent records and its own images' phrase pairs, the same rule within the domain) and adopts them for a
method only when every domain meets ``--min-empty`` and their Avg Dice beats the single threshold's on
validation. One threshold cannot serve over-confident large lesions and faint small nodules at once; a threshold
per domain can. The single threshold stays in the file: it is what an image of no known domain gets.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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
DOMAIN_RULE = ("per domain (the image's dataset), the same rule on its headline Dice, its absent records and its "
               "images' phrase pairs; adopted only when every domain meets min_empty and the domains' Avg Dice "
               "beats the single threshold's")


@dataclass(frozen=True)
class SweepPoint:
    """One threshold's validation numbers for one method."""

    threshold: float
    dice: dict[str, float]      # dataset -> mean Dice of its headline structure's positive records
    avg_dice: float
    absent_empty: float         # share of gt-empty records predicted < NEGATIVE_AREA
    phrases_empty: float        # share of (image, validation phrase) pairs predicted < NEGATIVE_AREA
    # the same two shares per domain (the image's dataset), and how many records / pairs each share counts
    absent_empty_by: dict[str, float] = field(default_factory=dict)
    phrases_empty_by: dict[str, float] = field(default_factory=dict)
    absent_count_by: dict[str, int] = field(default_factory=dict)
    phrases_count_by: dict[str, int] = field(default_factory=dict)

    @property
    def worst_empty(self) -> float:
        return min(self.absent_empty, self.phrases_empty)

    def in_domain(self, domain: str) -> SweepPoint:
        """This threshold's numbers within one domain (Avg Dice = that domain's Dice)."""
        return SweepPoint(self.threshold, {domain: self.dice[domain]}, self.dice[domain],
                          self.absent_empty_by.get(domain, 1.0), self.phrases_empty_by.get(domain, 1.0))


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
    absent, absent_domains = [], []
    for index, record in enumerate(dataset.records):
        probability = torch.stack([m.records[index].float() for m in maps]).mean(0)    # (224, 224)
        gt = load_mask(dataset.root, record)                                          # (H, W) bool, stored grid
        if probability.shape != gt.shape:
            probability = resize_to(probability[None, None], gt.shape)[0, 0]
        masks = probability[None] >= thresholds                                       # (T, H, W)
        if not gt.any():
            absent.append(masks.float().mean((1, 2)) < NEGATIVE_AREA)
            absent_domains.append(record.dataset)
        elif headline.get(record.dataset) == record.structure:
            target = torch.from_numpy(gt)
            overlap = (masks & target).sum((1, 2)).float()
            dice[record.dataset].append(2 * overlap / (masks.sum((1, 2)) + target.sum()).float())
    phrases = torch.stack([m.phrases.float() for m in maps]).mean(0)                  # (I, P, 224, 224)
    phrase_empty = torch.stack([(phrases >= t).float().mean((2, 3)) < NEGATIVE_AREA
                                for t in thresholds[:, 0, 0]]).float()                # (T, I, P)
    phrases_empty = phrase_empty.flatten(1).mean(1)                                   # (T,)
    absent_hits = torch.stack(absent).float() if absent else torch.ones(0, len(thresholds))   # (A, T)
    absent_empty = absent_hits.mean(0) if absent else torch.ones(len(thresholds))
    image_domains = [dataset.records[indices[0]].dataset for indices in images_of(dataset).values()]
    domains = list(dict.fromkeys([*image_domains, *absent_domains]))
    absent_of = {d: [i for i, a in enumerate(absent_domains) if a == d] for d in domains}
    phrases_of = {d: [i for i, a in enumerate(image_domains) if a == d] for d in domains}
    points = []
    for t, threshold in enumerate(thresholds[:, 0, 0].tolist()):
        per_dataset = {d: float(torch.stack(v)[:, t].mean()) for d, v in dice.items() if v}
        points.append(SweepPoint(
            round(threshold, 4), per_dataset, statistics.fmean(per_dataset.values()),
            float(absent_empty[t]), float(phrases_empty[t]),
            absent_empty_by={d: float(absent_hits[i, t].mean()) for d, i in absent_of.items() if i},
            phrases_empty_by={d: float(phrase_empty[t, i].mean()) for d, i in phrases_of.items() if i},
            absent_count_by={d: len(i) for d, i in absent_of.items() if i},
            phrases_count_by={d: len(i) * phrase_empty.shape[2] for d, i in phrases_of.items() if i}))
    return points


def choose(points: Sequence[SweepPoint], min_empty: float = MIN_EMPTY) -> tuple[SweepPoint, bool]:
    """The operating point of :data:`RULE`, and whether it leaves at least ``min_empty`` of both kinds empty."""
    meeting = [p for p in points if p.worst_empty >= min_empty]
    if meeting:
        return max(meeting, key=lambda p: (p.avg_dice, -abs(p.threshold - 0.5))), True
    return max(points, key=lambda p: (p.worst_empty, p.avg_dice, -abs(p.threshold - 0.5))), False


def choose_per_domain(points: Sequence[SweepPoint], min_empty: float = MIN_EMPTY) -> dict[str, Any]:
    """:data:`DOMAIN_RULE`: each domain's operating point, and what they give together on validation.

    Returns {"thresholds": {domain: t}, "domains": {domain: SweepPoint dict + meets_min_empty}, "avg_dice",
    "absent_empty", "phrases_empty" (pooled over the domains, each at its own threshold), "meets_min_empty"}."""
    by_threshold = {p.threshold: p for p in points}
    domains: dict[str, Any] = {}
    for domain in points[0].dice:
        chosen, met = choose([p.in_domain(domain) for p in points], min_empty)
        domains[domain] = {**asdict(chosen), "meets_min_empty": met}

    def pooled(shares: str, counts: str) -> float:
        total = weight = 0.0
        for domain, entry in domains.items():
            at = by_threshold[entry["threshold"]]
            n = getattr(at, counts).get(domain, 0)
            total, weight = total + getattr(at, shares).get(domain, 1.0) * n, weight + n
        return total / weight if weight else 1.0

    return {"thresholds": {d: e["threshold"] for d, e in domains.items()}, "domains": domains,
            "avg_dice": statistics.fmean(e["avg_dice"] for e in domains.values()),
            "absent_empty": pooled("absent_empty_by", "absent_count_by"),
            "phrases_empty": pooled("phrases_empty_by", "phrases_count_by"),
            "meets_min_empty": all(e["meets_min_empty"] for e in domains.values())}


def adopt_per_domain(per_domain: dict[str, Any], single: SweepPoint) -> bool:
    """The per-domain thresholds replace the single one only if every domain meets the emptiness target and
    their Avg Dice beats the single threshold's on validation."""
    return per_domain["meets_min_empty"] and per_domain["avg_dice"] > single.avg_dice


def sweep_table(name: str, points: Sequence[SweepPoint], chosen: SweepPoint) -> str:
    datasets = list(points[0].dice)
    header = ["threshold", *(f"{d} Dice" for d in datasets), "Avg Dice", "absent empty", "phrases empty"]
    body = [[f"**{p.threshold:g}**" if p is chosen else f"{p.threshold:g}", *(f"{p.dice[d]:.3f}" for d in datasets),
             f"{p.avg_dice:.3f}", f"{p.absent_empty:.3f}", f"{p.phrases_empty:.3f}"] for p in points]
    return f"### {name}\n\n" + markdown_table(header, body)


def domain_table(per_domain: dict[str, Any], single: SweepPoint, adopted: bool) -> str:
    """Each domain's own choice beside the single threshold, and what each gives pooled over the domains."""
    header = ["", *per_domain["domains"], "Avg Dice", "absent empty", "phrases empty"]
    rows = [["single threshold" + (" (kept)" if not adopted else ""),
             *(f"{single.dice[d]:.3f} @ {single.threshold:g}" for d in per_domain["domains"]),
             f"{single.avg_dice:.3f}", f"{single.absent_empty:.3f}", f"{single.phrases_empty:.3f}"],
            ["per domain" + (" (adopted)" if adopted else ""),
             *(f"{e['avg_dice']:.3f} @ {e['threshold']:g}" for e in per_domain["domains"].values()),
             f"{per_domain['avg_dice']:.3f}", f"{per_domain['absent_empty']:.3f}",
             f"{per_domain['phrases_empty']:.3f}"]]
    return "\nPer domain (Dice @ threshold):\n\n" + markdown_table(header, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR[,DIR...]",
                        help="methods, as train.evaluate's --runs (ensembles allowed)")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (freqmedclip.data.format)")
    parser.add_argument("--split", default="val", help="never the split the tables report")
    parser.add_argument("--out", type=Path, required=True, help="JSON with every method's sweep and choice")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    parser.add_argument("--min-empty", type=float, default=MIN_EMPTY)
    parser.add_argument("--per-domain", action="store_true",
                        help="also choose one threshold per domain, adopted where it beats the single one")
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
        "domain_rule": DOMAIN_RULE if args.per_domain else None,
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
        entry = result["methods"][method.name] = {"checkpoints": [str(c) for c in method.checkpoints],
                                                  "threshold": chosen.threshold, "meets_min_empty": met,
                                                  "chosen": asdict(chosen), "sweep": [asdict(p) for p in points]}
        tables.append(sweep_table(method.name, points, chosen))
        print(f"{method.name}: threshold {chosen.threshold:g} (Avg Dice {chosen.avg_dice:.3f}, absent empty "
              f"{chosen.absent_empty:.3f}, phrases empty {chosen.phrases_empty:.3f}"
              f"{'' if met else f', below {args.min_empty:g}'})", flush=True)
        if args.per_domain:
            per_domain = choose_per_domain(points, args.min_empty)
            adopted = adopt_per_domain(per_domain, chosen)
            entry["per_domain"] = {**per_domain, "adopted": adopted}
            tables.append(domain_table(per_domain, chosen, adopted))
            print(f"  per domain {per_domain['thresholds']}: Avg Dice {per_domain['avg_dice']:.3f} -> "
                  f"{'adopted' if adopted else 'not adopted'}", flush=True)
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text("\n".join(tables)))
    for name, path in ships.items():
        entry = result["methods"][name]
        shipped = {"threshold": entry["threshold"], "meets_min_empty": entry["meets_min_empty"],
                   "validation": entry["chosen"], "checkpoints": entry["checkpoints"],
                   **{k: result[k] for k in ("data", "split", "rule", "min_empty", "command", "code_version")}}
        if entry.get("per_domain", {}).get("adopted"):
            shipped |= {"domain_thresholds": entry["per_domain"]["thresholds"], "domain_rule": DOMAIN_RULE,
                        "domain_validation": entry["per_domain"]["domains"]}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(shipped, indent=2)))
    print("\n".join(tables))
    return result


if __name__ == "__main__":
    main()
