"""Where a checkpoint's logits sit on the target, per dataset, for the fused output and each branch.

A mask that is empty at 0.5 can come from two different failures, and they call for different fixes:

* the logits still rank the target above its background (pixel AUC well above 0.5) but everything sits far below 0:
  the model answers "absent" with confidence, a calibration and loss-balance problem (more weight on target pixels,
  fewer easy negatives);
* the logits do not rank the target at all (AUC ~0.5): the model has not learnt the structure (more data, more steps,
  more resolution).

    python -m train.logit_report assets/public/checkpoints/mini-seed0 --data data/public --split val

Statistics are over positive cases only (the target is present), ``--per-dataset`` of them evenly spaced per dataset,
at the model's 224 x 224 output (masks resized there with nearest neighbour).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from freqmedclip.data.dataset import SegmentationDataset
from freqmedclip.inference.checkpoint import atomic_write, load_ensemble
from train.evaluate import markdown_table

OUTPUTS = ("fused", "semantic", "frequency")
STATISTICS = ("auc", "logit_inside", "logit_outside", "max_probability")


def pixel_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (N,) for boolean ``labels`` (N,): the probability that a random target
    pixel scores above a random background pixel, ties counting one half (Mann-Whitney U / (n1 n0)). NaN when one
    class is absent."""
    labels = labels.astype(bool)
    n_target, n_background = int(labels.sum()), int((~labels).sum())
    if n_target == 0 or n_background == 0:
        return math.nan
    ranks = rankdata(scores)                     # average ranks for ties
    u = ranks[labels].sum() - n_target * (n_target + 1) / 2
    return float(u / (n_target * n_background))


def case_statistics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """One map's statistics. logits: (H, W) float; target: (H, W) bool with at least one pixel set."""
    scores, labels = logits.double().flatten().numpy(), target.flatten().numpy()
    return {"auc": pixel_auc(scores, labels), "logit_inside": float(scores[labels].mean()),
            "logit_outside": float(scores[~labels].mean()) if (~labels).any() else math.nan,
            "max_probability": float(torch.sigmoid(logits.double().max()))}


def evenly_spaced(indices: Sequence[int], count: int) -> list[int]:
    """``count`` of ``indices`` spread over the whole list, both ends kept (all of them when there are fewer)."""
    positions = np.unique(np.linspace(0, len(indices) - 1, min(count, len(indices))).round().astype(int))
    return [indices[p] for p in positions]


@torch.no_grad()
def logit_statistics(model: torch.nn.Module, dataset: SegmentationDataset,
                     per_dataset: int = 40) -> dict[str, dict[str, Any]]:
    """{dataset: {"cases": n, output: {statistic: mean over cases}}} over positive cases, outputs the model has."""
    by_dataset: dict[str, list[int]] = {}
    for index, record in enumerate(dataset.records):
        if record.positive:
            by_dataset.setdefault(record.dataset, []).append(index)
    report: dict[str, dict[str, Any]] = {}
    for name, indices in sorted(by_dataset.items()):
        rows: dict[str, list[dict[str, float]]] = {o: [] for o in OUTPUTS}
        chosen = evenly_spaced(indices, per_dataset)
        for index in chosen:
            item = dataset[index]
            output = model(item["image"][None], [item["prompt"]])              # logits (1, 1, 224, 224)
            target = F.interpolate(item["mask"][None].float(), size=output.logits.shape[-2:], mode="nearest")
            target = target[0, 0] > 0.5                                         # (224, 224) bool
            for key, logits in zip(OUTPUTS, (output.logits, output.semantic_logits, output.frequency_logits)):
                if logits is not None:
                    rows[key].append(case_statistics(logits[0, 0].float(), target))
        report[name] = {"cases": len(chosen)}
        for key, values in rows.items():
            if values:
                report[name][key] = {s: float(np.nanmean([v[s] for v in values])) for s in STATISTICS}
    return report


def markdown(report: dict[str, dict[str, Any]]) -> str:
    header = ["dataset", "cases", "output", "pixel AUC", "mean logit in target", "mean logit outside",
              "max probability"]
    body = [[name, str(entry["cases"]), key, f"{s['auc']:.2f}", f"{s['logit_inside']:.1f}",
             f"{s['logit_outside']:.1f}", f"{s['max_probability']:.3f}"]
            for name, entry in report.items() for key in OUTPUTS if key in entry for s in [entry[key]]]
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a published checkpoint folder (config.json + safetensors)")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (manifest.jsonl)")
    parser.add_argument("--split", default="val", help="never tune on test: val by default")
    parser.add_argument("--per-dataset", type=int, default=40, help="positive cases per dataset, evenly spaced")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.per_dataset < 1:
        parser.error(f"--per-dataset must be at least 1, got {args.per_dataset}")
    model = load_ensemble([args.checkpoint], device="cpu")[0].eval()
    report = logit_statistics(model, SegmentationDataset(args.data, args.split, train=False), args.per_dataset)
    print(f"{args.checkpoint} on {args.data} ({args.split}), positive cases\n")
    print(markdown(report))
    if args.out is not None:
        payload = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split,
                   "command": " ".join(["python -m train.logit_report", *(argv if argv is not None else sys.argv[1:])]),
                   "report": report}
        atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    return report


if __name__ == "__main__":
    main()
