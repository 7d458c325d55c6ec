"""Evaluate checkpoints on a split: per-case CSV, summaries and the paper's Tables 3-6 (Section 5).

    python -m train.evaluate --checkpoint DIR [DIR ...] --data DIR --split test --out DIR [--name NAME]
        [--runs NAME=DIR[,DIR...] ...] [--tolerance-mm 2.0] [--dtype fp32|bf16] [--device auto]
        [--threshold 0.5 | --operating-points FILE] [--table-structure DATASET=STRUCTURE ...] [--full-method NAME]
        [--max-cases N] [--save-masks]

Each method is one checkpoint or an ensemble: the directories given together to ``--checkpoint`` (named ``--name``,
default its variant) or to one ``--runs NAME=a,b,c`` entry are loaded with ``load_ensemble`` (one shared CLIP
backbone) and their probabilities averaged by the ``Predictor``. A directory may also be a training run directory
holding ``best/``. Outputs in ``--out``: ``cases_<method>.csv`` (one row per (image, prompt) record),
``summary.json``, ``tables.md`` and, with ``--save-masks``, ``masks/<method>/<sample_id>__<structure>.png``.

Notable choices:
* Geometry: the model sees the stored image resized to 224 (as in training); its probability map is bilinearly
  upsampled to the stored mask's grid, thresholded at ``--threshold`` (``>=``, as the Predictor), and every metric
  is computed there with the record's ``spacing_mm``. For converters that store 224x224 masks (all of ours) that
  grid IS the stored 224 grid, with the spacing already rescaled to it; the native scanner grid is not revisited.
* Thresholds: with ``--operating-points`` (the JSON of ``train.operating_point``) each method is thresholded at its
  own threshold, chosen on validation, instead of ``--threshold``; where ``--per-domain`` adopted thresholds per
  domain for a method, each image is thresholded at its dataset's.
* Metrics and conventions come from ``freqmedclip.evaluation.metrics`` (DATA.md 4.3): both masks empty -> Dice = IoU = NSD = 1,
  distances 0; exactly one empty -> overlap 0 and distances = the image diagonal in mm. Such cases are kept and
  counted, never dropped. HD95 is the max of the two directed 95th percentiles; "Boundary Dice" is NSD at
  ``--tolerance-mm``. The CSV column ``hd`` is the Hausdorff distance (eq. 21); ``pred_area`` is the predicted
  fraction of the image.
* Tables 3-5 use the POSITIVE cases (target present) of one headline structure per dataset (``--table-structure``;
  default the dataset's first structure in manifest order, e.g. whole tumour), as the paper's benchmarks segment
  slices that contain the target and ``freqmedclip.evaluation.summary`` needs one structure per (method, dataset). Every
  structure, with and without negatives, is in ``summary.json`` and in the detail tables. Negative prompts are
  scored separately: the fraction of GT-empty cases whose predicted area is below 1 % of the image.
* Table 6: every case is one forward at batch 1 (an ensemble runs all its members), timed on the wall clock after
  ``--warmup`` untimed passes (CUDA synchronised); text features are cached per prompt, as in the Predictor. Peak
  memory is CUDA ``max_memory_allocated`` since the method's models were loaded, or on CPU the process's peak
  resident set (VmHWM, reset per method through /proc/self/clear_refs; it includes Python and the libraries).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from freqmedclip.evaluation import metrics, summary
from freqmedclip.modeling.backbone import ClipBackbone
from freqmedclip.inference.benchmark import device_name, peak_memory_mb, reset_peak_memory, synchronize
from freqmedclip.inference.checkpoint import atomic_write, code_version, load_ensemble, read_checkpoint_header
from freqmedclip.data.dataset import SegmentationDataset
from freqmedclip.data.format import load_mask, mask_path
from freqmedclip.inference.predictor import Predictor
from freqmedclip.inference.preprocess import resize_to

CSV_COLUMNS = ("method", "sample_id", "subject_id", "dataset", "structure", "prompt", "positive", "dice", "iou", "hd",
               "hd95", "assd", "nsd", "pred_area", "gt_empty", "pred_empty", "time_ms", "semantic_dice", "frequency_dice")
BRANCHES = ("semantic", "frequency")   # each branch's own mask, sigma(L_s) / sigma(L_f) >= threshold, scored by Dice
METRIC_COLUMNS = {"dice": "dice", "iou": "iou", "hausdorff": "hd", "hd95": "hd95", "assd": "assd", "nsd": "nsd"}
NEGATIVE_AREA = 0.01            # a negative prompt is "respected" when less than 1 % of the image is predicted
# Phrases never used in training (disjoint from freqmedclip.data.dataset.UNRELATED_TRAIN_PROMPTS, tested): asked of
# every image of the split, each should come back (almost) empty. The first is the demo's control prompt.
HELD_OUT_UNRELATED_PROMPTS = ("a purple elephant riding a bicycle", "pancreas", "a bowl of soup",
                              "a football stadium", "gallbladder", "a violin")
# Metadata keys of the public converters worth a subgroup table: BUS-BRA biopsy result, LIDC nodule size class,
# TCGA-LGG WHO grade code ("2" / "3").
SUBGROUP_KEYS = ("pathology", "size_bin", "neoplasm_histologic_grade")
ABLATION_VARIANTS = ("no_freq", "no_ffbi", "no_lffi", "no_dual_decoder", "no_tca", "tca_film")


@dataclass
class Method:
    """One evaluated method: a checkpoint or an ensemble of checkpoints."""

    name: str
    checkpoints: list[Path]
    variants: list[str] = field(default_factory=list)
    threshold: float = 0.5
    domain_thresholds: dict[str, float] = field(default_factory=dict)   # dataset -> its own, where chosen so
    rows: list[dict[str, Any]] = field(default_factory=list)
    unrelated_areas: list[float] = field(default_factory=list)    # predicted area per (image, held-out phrase)
    unrelated_datasets: list[str] = field(default_factory=list)   # the image's dataset, per entry of unrelated_areas
    efficiency: dict[str, Any] = field(default_factory=dict)

    def threshold_for(self, dataset: str) -> float:
        """The threshold of an image of ``dataset``: its domain's where one was chosen, else the method's."""
        return self.domain_thresholds.get(dataset, self.threshold)

    def threshold_label(self) -> str:
        if not self.domain_thresholds:
            return f"{self.threshold:g}"
        return ", ".join(f"{d} {t:g}" for d, t in self.domain_thresholds.items()) + f" (else {self.threshold:g})"


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a training run directory's ``best/`` checkpoint."""
    for candidate in (path, path / "best"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise FileNotFoundError(f"{path}: neither a checkpoint (config.json + model.safetensors) nor a run with best/")


def parse_methods(args: argparse.Namespace) -> list[Method]:
    """Methods from ``--checkpoint``/``--name`` and ``--runs NAME=a,b``, in command-line order."""
    methods = []
    if args.checkpoint:
        checkpoints = [resolve_checkpoint(p) for p in args.checkpoint]
        methods.append(Method(args.name or "", checkpoints))
    for spec in args.runs or []:
        name, sep, dirs = spec.partition("=")
        if not sep or not name or not dirs:
            raise SystemExit(f"--runs expects NAME=DIR[,DIR...], got {spec!r}")
        methods.append(Method(name, [resolve_checkpoint(Path(d)) for d in dirs.split(",") if d]))
    if not methods:
        raise SystemExit("nothing to evaluate: give --checkpoint DIR [DIR ...] and/or --runs NAME=DIR[,DIR...]")
    for method in methods:
        method.variants = [read_checkpoint_header(c)["config"]["variant"] for c in method.checkpoints]
        if not method.name:
            method.name = method.variants[0] if len(set(method.variants)) == 1 else method.checkpoints[0].name
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise SystemExit(f"method names must be unique, got {names}")
    return methods


def apply_operating_points(methods: Sequence[Method], path: Path | None, default: float) -> None:
    """Set every method's threshold: ``default``, or with ``path`` its entry there (same name, same checkpoints),
    with its per-domain thresholds where ``train.operating_point --per-domain`` adopted them."""
    if path is None:
        for method in methods:
            method.threshold = default
        return
    chosen = json.loads(path.read_text())["methods"]
    for method in methods:
        entry = chosen.get(method.name)
        if entry is None:
            raise SystemExit(f"{path} has no operating point for {method.name!r} (it has {sorted(chosen)})")
        if entry["checkpoints"] != [str(c) for c in method.checkpoints]:
            raise SystemExit(f"{path}: the operating point of {method.name!r} was chosen for {entry['checkpoints']}, "
                             f"not {[str(c) for c in method.checkpoints]}")
        method.threshold = float(entry["threshold"])
        per_domain = entry.get("per_domain") or {}
        method.domain_thresholds = {d: float(t) for d, t in per_domain["thresholds"].items()} \
            if per_domain.get("adopted") else {}


def file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---- evaluation ----

def mask_on_grid(probability: torch.Tensor, shape: tuple[int, ...], threshold: float) -> np.ndarray:
    """(1, 1, 224, 224) probabilities -> (H, W) bool mask on the stored grid: bilinear to ``shape``, then threshold."""
    if tuple(probability.shape[-2:]) != tuple(shape):
        probability = resize_to(probability, shape)
    return (probability[0, 0] >= threshold).cpu().numpy()


def evaluate_method(method: Method, dataset: SegmentationDataset, device: torch.device, dtype: str,
                    tolerance_mm: float, warmup: int, backbones: dict[str, ClipBackbone],
                    max_cases: int | None = None, save_masks: Path | None = None) -> None:
    """Predict every record of ``dataset`` with ``method`` and fill ``method.rows`` and ``method.efficiency``;
    each image is thresholded at ``method.threshold_for`` its dataset.

    ``save_masks``: also write each predicted mask (stored grid, 0/255 PNG) as ``<sample_id>__<structure>.png``.
    """
    header = read_checkpoint_header(method.checkpoints[0])
    cached = backbones.get(header["backbone"]["sha256"])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peak_reset = reset_peak_memory(device)
    models = load_ensemble(method.checkpoints, backbone=cached, device=device)
    backbones.setdefault(models[0].backbone_sha256, models[0].clip_backbone)
    predictor = Predictor(models, device=str(device), dtype=dtype, threshold=method.threshold)

    n = len(dataset) if max_cases is None else min(max_cases, len(dataset))
    first = dataset[0]
    for _ in range(warmup):
        predictor.predict_tensor(first["image"][None].to(device), [first["prompt"]])
    synchronize(device)

    times = []
    for index in range(n):
        item, record = dataset[index], dataset.records[index]
        gt = load_mask(dataset.root, record)                                          # (H, W) bool, stored grid
        image = item["image"][None].to(device)                                        # (1, 3, 224, 224)
        synchronize(device)
        start = time.perf_counter()
        maps = predictor.predict_tensor(image, [item["prompt"]])                      # each (1, 1, 224, 224)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
        threshold = method.threshold_for(record.dataset)
        pred = mask_on_grid(maps["probability"], gt.shape, threshold)
        branch_dice = {f"{b}_dice": math.nan if maps[b] is None else
                       metrics.dice(mask_on_grid(maps[b], gt.shape, threshold), gt) for b in BRANCHES}
        if save_masks is not None:
            save_masks.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pred.astype(np.uint8) * 255).save(save_masks / Path(mask_path(record.sample_id,
                                                                                           record.structure)).name)
        values = metrics.case_metrics(pred, gt, record.spacing_mm, tolerance_mm)
        method.rows.append({
            "method": method.name, "sample_id": record.sample_id, "subject_id": record.subject_id,
            "dataset": record.dataset, "structure": record.structure, "prompt": item["prompt"],
            "positive": record.positive, **{k: values[k] for k in metrics.METRIC_NAMES},
            "pred_area": float(pred.mean()), "gt_empty": values["gt_empty"], "pred_empty": values["pred_empty"],
            "time_ms": times[-1], **branch_dice,
        })

    images: dict[str, int] = {}
    for index in range(n):
        images.setdefault(dataset.records[index].image, index)
    for index in images.values():   # untimed: one batched call per image, every held-out phrase at once
        image = dataset[index]["image"][None].to(device)
        probability = predictor.predict_tensor(image, list(HELD_OUT_UNRELATED_PROMPTS))["probability"]
        threshold = method.threshold_for(dataset.records[index].dataset)
        method.unrelated_areas += (probability >= threshold).float().mean((1, 2, 3)).tolist()
        method.unrelated_datasets += [dataset.records[index].dataset] * len(HELD_OUT_UNRELATED_PROMPTS)

    peak_mb, kind = peak_memory_mb(device)
    if not peak_reset:
        kind += " (cumulative: could not reset)"
    method.efficiency = {
        "method": method.name, "time_ms": statistics.fmean(times),
        "time_ms_sd": statistics.stdev(times) if len(times) > 1 else 0.0, "time_ms_median": statistics.median(times),
        "peak_memory_mb": peak_mb, "peak_memory_kind": kind, "n_timed": len(times), "batch_size": 1,
        "members": len(models),
    }
    del predictor, models


def write_cases(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Per-case CSV; floats at full precision (``repr``), so they read back exactly."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for row in rows:
                out = {**row, **{column: row[key] for key, column in METRIC_COLUMNS.items()}}
                writer.writerow([repr(out[c]) if isinstance(out[c], float) else out[c] for c in CSV_COLUMNS])
    atomic_write(path, write)


def empty_share(areas: Sequence[float], count_key: str) -> dict[str, Any]:
    """How many of ``areas`` (predicted area fractions) are (almost) empty, below ``NEGATIVE_AREA`` of the image;
    ``count_key`` names the count of what was asked (GT-empty cases, or image-phrase pairs)."""
    ok = sum(a < NEGATIVE_AREA for a in areas)
    return {count_key: len(areas), "n_below_area": ok, "fraction": ok / len(areas) if areas else None,
            "mean_pred_area": statistics.fmean(areas) if areas else None}


def negative_check(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Share of GT-empty cases predicted (almost) empty (area < ``NEGATIVE_AREA`` of the image), overall and per
    dataset."""
    def share(subset: list[dict[str, Any]]) -> dict[str, Any]:
        return empty_share([r["pred_area"] for r in subset], "n_gt_empty")

    empty = [r for r in rows if r["gt_empty"]]
    per_dataset = {d: share([r for r in empty if r["dataset"] == d]) for d in dict.fromkeys(r["dataset"] for r in rows)}
    return {"max_area_fraction": NEGATIVE_AREA, **share(empty), "per_dataset": per_dataset}


def unrelated_check(method: Method) -> dict[str, Any]:
    """Share of (image, held-out unrelated phrase) pairs predicted (almost) empty, pooled and per dataset (a pooled
    share can hide one domain that answers unrelated phrases)."""
    by_dataset: dict[str, list[float]] = {}
    for name, area in zip(method.unrelated_datasets, method.unrelated_areas, strict=True):
        by_dataset.setdefault(name, []).append(area)
    return {"prompts": list(HELD_OUT_UNRELATED_PROMPTS), **empty_share(method.unrelated_areas, "n_pairs"),
            "per_dataset": {name: empty_share(areas, "n_pairs") for name, areas in by_dataset.items()}}


def empty_counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    gt = np.array([r["gt_empty"] for r in rows], dtype=bool)
    pred = np.array([r["pred_empty"] for r in rows], dtype=bool)
    return {"n_cases": len(rows), "n_gt_empty": int(gt.sum()), "n_pred_empty": int(pred.sum()),
            "n_both_empty": int((gt & pred).sum()), "n_one_empty": int((gt ^ pred).sum()),
            "n_missed": int((~gt & pred).sum()), "n_false_alarm": int((gt & ~pred).sum())}


def headline_structures(records: Sequence[Any], overrides: Sequence[str]) -> dict[str, str]:
    """Dataset -> structure used in Tables 3-5: the first positive structure in manifest order, or an override."""
    chosen: dict[str, str] = {}
    for record in records:
        if record.positive:
            chosen.setdefault(record.dataset, record.structure)
    for spec in overrides:
        dataset, sep, structure = spec.partition("=")
        if not sep or dataset not in chosen:
            raise SystemExit(f"--table-structure expects DATASET=STRUCTURE with a dataset in {sorted(chosen)}, "
                             f"got {spec!r}")
        chosen[dataset] = structure
    return chosen


# ---- tables ----

def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """GitHub markdown; first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def _pm(row: dict[str, Any], metric: str) -> str:
    d = summary.DECIMALS[metric]
    return f"{row[f'{metric}_mean']:.{d}f} ± {row[f'{metric}_sd']:.{d}f}"


def detail_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per (method, dataset, structure): n, Dice mean ± SD, median [IQR], 95 % subject-bootstrap CI,
    IoU, HD95 and NSD."""
    header = ["Method", "Dataset", "Structure", "n (subjects)", "Dice mean ± SD", "Dice median [IQR]", "Dice 95% CI",
              "IoU mean ± SD", "HD95 (mm) mean ± SD", "NSD mean ± SD", "GT empty", "worst-case"]
    body = []
    for r in rows:
        body.append([r["method"], r["dataset"], r["structure"], f"{r['n_cases']} ({r['n_subjects']})", _pm(r, "dice"),
                     f"{r['dice_median']:.3f} [{r['dice_q1']:.3f}, {r['dice_q3']:.3f}]",
                     f"[{r['dice_ci_lo']:.3f}, {r['dice_ci_hi']:.3f}]", _pm(r, "iou"), _pm(r, "hd95"), _pm(r, "nsd"),
                     str(r["n_gt_empty"]), str(r["n_one_empty"])])
    return markdown_table(header, body)


def subgroup_rows(methods: Sequence[Method], records: Sequence[Any], keys: Sequence[str]) -> list[dict[str, Any]]:
    """The positive rows again, once per metadata key the record has (nested dicts searched one level down),
    with the structure renamed "structure, key = value", ready for ``summary.summarize``."""
    def lookup(metadata: dict[str, Any], key: str) -> Any:
        if key in metadata:
            return metadata[key]
        return next((v[key] for v in metadata.values() if isinstance(v, dict) and key in v), None)

    out = []
    for method in methods:
        for row, record in zip(method.rows, records):
            for key in keys if row["positive"] else ():
                value = lookup(record.metadata, key)
                if value is not None:
                    out.append({**row, "structure": f"{row['structure']}, {key} = {value}"})
    return out


def negative_table(methods: Sequence[Method], checks: dict[str, dict[str, Any]]) -> str:
    datasets = list(dict.fromkeys(r["dataset"] for m in methods for r in m.rows))
    header = ["Method", *(f"{d}" for d in datasets), "All"]
    body = []
    for m in methods:
        check = checks[m.name]
        cells = []
        unrelated = unrelated_check(m)
        for share, count_key in ((check, "n_gt_empty"), (unrelated, "n_pairs")):
            for entry in [*(share["per_dataset"].get(d, {"fraction": None}) for d in datasets), share]:
                cells.append("n/a" if entry["fraction"] is None else
                             f"{entry['fraction']:.3f} ({entry['n_below_area']}/{entry[count_key]})")
        body.append([m.name, *cells])
    held_out = [f"held-out phrases, {d}" for d in datasets]
    return markdown_table([*header, *held_out, "Unrelated phrases (held out)"], body)


def branch_rows(methods: Sequence[Method], headline: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {dataset: {"fused", "semantic", "frequency": mean Dice}}} over the positive cases of the headline
    structures, for methods whose branches both answer (two-stream models)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in methods:
        rows = [r for r in m.rows if r["positive"] and headline.get(r["dataset"]) == r["structure"]]
        if not rows or any(math.isnan(r[f"{b}_dice"]) for r in rows for b in BRANCHES):
            continue
        out[m.name] = {}
        for dataset in dict.fromkeys(r["dataset"] for r in rows):
            group = [r for r in rows if r["dataset"] == dataset]
            out[m.name][dataset] = {"fused": statistics.fmean(r["dice"] for r in group),
                                    **{b: statistics.fmean(r[f"{b}_dice"] for r in group) for b in BRANCHES}}
    return out


def branch_table(branches: dict[str, dict[str, dict[str, float]]]) -> str:
    datasets = list(dict.fromkeys(d for per in branches.values() for d in per))
    header = ["Method", *(f"{d}: fused / semantic / frequency" for d in datasets)]
    body = [[name, *(" / ".join(f"{per[d][k]:.3f}" for k in ("fused", *BRANCHES)) if d in per else "n/a"
                     for d in datasets)] for name, per in branches.items()]
    return markdown_table(header, body)


def empty_table(methods: Sequence[Method], counts: dict[str, dict[str, int]]) -> str:
    keys = ("n_cases", "n_gt_empty", "n_pred_empty", "n_both_empty", "n_one_empty", "n_missed", "n_false_alarm")
    labels = ("cases", "GT empty", "pred empty", "both empty (perfect)", "one empty (worst-case)",
              "missed (pred empty, GT not)", "false alarm (GT empty, pred not)")
    return markdown_table(["Method", *labels], [[m.name, *(str(counts[m.name][k]) for k in keys)] for m in methods])


def build_tables(methods: Sequence[Method], headline: dict[str, str], positive_summary: list[dict[str, Any]],
                 all_summary: list[dict[str, Any]], checks: dict[str, dict[str, Any]],
                 counts: dict[str, dict[str, int]], branches: dict[str, dict[str, dict[str, float]]],
                 args: argparse.Namespace, device: torch.device, full: str) -> str:
    table_rows = [r for r in positive_summary if headline.get(r["dataset"]) == r["structure"]]
    names = [m.name for m in methods]
    structures = ", ".join(f"{d}: {s}" for d, s in headline.items())
    threshold = (f"Threshold {args.threshold}" if args.operating_points is None else
                 "Thresholds chosen on validation (`" + str(args.operating_points) + "`): "
                 + "; ".join(f"{m.name} {m.threshold_label()}" for m in methods))
    parts = [
        f"# Evaluation on `{args.data}` split `{args.split}`\n",
        (f"{threshold}, dtype {args.dtype}, device {device_name(device)}, code {code_version()}. "
         f"Tables 3-5: positive cases (target present) of {structures}; mean [subject-level bootstrap 95 % CI] over "
         f"cases. Distances in mm at the stored mask grid; HD95 = max of directed 95th percentiles; Boundary Dice = "
         f"NSD at {args.tolerance_mm:g} mm. Empty-mask conventions: DATA.md 4.3 (counts below).\n"),
        "## Table 3: Dice / IoU\n", summary.overlap_table(table_rows, methods=names),
    ]
    if len(methods) > 1:
        variant = {m.name: m.variants[0] for m in methods}
        others = [n for n in names if n != full]
        ablations = [n for n in others if variant[n] in ABLATION_VARIANTS] or others
        parts += [f"## Table 4: ablations (Δ Dice vs `{full}`)\n", summary.ablation_table(table_rows, full, ablations)]
    parts += [
        "## Table 5: boundary quality\n",
        summary.boundary_table(table_rows, args.tolerance_mm, methods=names, with_hd95=True),
        "## Table 6: inference time and peak memory\n",
        summary.efficiency_table([m.efficiency for m in methods]),
        (f"Per image at batch 1 (ensembles: all members), mean ± SD over {methods[0].efficiency['n_timed']} cases "
         f"after {args.warmup} warm-up passes; memory: {methods[0].efficiency['peak_memory_kind']}.\n"),
        "## Branches: each stream's own mask (Dice, positive cases of the headline structures)\n",
        branch_table(branches) if branches else "No two-stream method.\n",
        f"## Negative prompts: share of GT-empty cases with predicted area < {NEGATIVE_AREA:.0%}\n",
        negative_table(methods, checks),
        ("Unrelated phrases: every image of the split asked " + ", ".join(f"'{p}'" for p in HELD_OUT_UNRELATED_PROMPTS)
         + " (never used in training).\n"),
        "## Empty-mask cases\n", empty_table(methods, counts),
        "## Detail: positive cases, every structure\n", detail_table(positive_summary),
        "## Detail: all cases (negative prompts included)\n", detail_table(all_summary),
        "## Methods\n",
        "\n".join(f"* `{m.name}`: {len(m.checkpoints)} checkpoint(s), variant(s) {', '.join(sorted(set(m.variants)))}: "
                  + ", ".join(f"`{c}`" for c in m.checkpoints) for m in methods) + "\n",
    ]
    return "\n".join(parts)


# ---- main ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, nargs="+", help="one checkpoint, or several = one ensemble")
    parser.add_argument("--name", help="method name of --checkpoint (default: its variant)")
    parser.add_argument("--runs", nargs="+", metavar="NAME=DIR[,DIR...]", help="more methods (ensembles allowed)")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (freqmedclip.data.format)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tolerance-mm", type=float, default=metrics.DEFAULT_TOLERANCE_MM, help="NSD tolerance")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--operating-points", type=Path, default=None, metavar="FILE",
                        help="per-method thresholds chosen on validation (train.operating_point's JSON)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--table-structure", nargs="+", default=[], metavar="DATASET=STRUCTURE")
    parser.add_argument("--full-method", help="reference of Table 4 (default: 'full' if present, else the first)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes before timing")
    parser.add_argument("--max-cases", type=int, default=None, help="evaluate only the first N records (smoke runs)")
    parser.add_argument("--n-boot", type=int, default=summary.N_BOOT, help="bootstrap replicates")
    parser.add_argument("--save-masks", action="store_true", help="write predicted masks to OUT/masks/<method>/")
    parser.add_argument("--subgroups", nargs="*", default=list(SUBGROUP_KEYS), metavar="KEY",
                        help="record metadata keys whose values split the positive cases into subgroups")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    methods = parse_methods(args)
    apply_operating_points(methods, args.operating_points, args.threshold)
    names = [m.name for m in methods]
    full = args.full_method or ("full" if "full" in names else names[0])
    if full not in names:
        raise SystemExit(f"--full-method {full!r} is not one of {names}")
    dataset = SegmentationDataset(args.data, args.split, train=False)
    args.out.mkdir(parents=True, exist_ok=True)

    backbones: dict[str, ClipBackbone] = {}
    for method in methods:
        start = time.perf_counter()
        masks = args.out / "masks" / file_stem(method.name) if args.save_masks else None
        evaluate_method(method, dataset, device, args.dtype, args.tolerance_mm, args.warmup,
                        backbones, args.max_cases, masks)
        write_cases(args.out / f"cases_{file_stem(method.name)}.csv", method.rows)
        positives = [r["dice"] for r in method.rows if r["positive"]]
        dice = statistics.fmean(positives) if positives else math.nan
        efficiency = method.efficiency
        print(f"{method.name}: {len(method.rows)} cases in {time.perf_counter() - start:.1f} s, positive-case Dice "
              f"{dice:.4f}, {efficiency['time_ms']:.1f} ms/image, peak {efficiency['peak_memory_mb']:.0f} MiB",
              flush=True)

    rows = [r for m in methods for r in m.rows]
    headline = headline_structures(dataset.records[:len(methods[0].rows)], args.table_structure)
    positive_summary = summary.summarize([r for r in rows if r["positive"]], n_boot=args.n_boot)
    all_summary = summary.summarize(rows, n_boot=args.n_boot)
    subgroups = summary.summarize(subgroup_rows(methods, dataset.records, args.subgroups), n_boot=args.n_boot) \
        if args.subgroups else []
    checks = {m.name: negative_check(m.rows) for m in methods}
    counts = {m.name: empty_counts(m.rows) for m in methods}
    branches = branch_rows(methods, headline)
    tables = build_tables(methods, headline, positive_summary, all_summary, checks, counts, branches, args, device, full)
    if subgroups:
        tables += ("\n## Subgroups: positive cases split by record metadata\n\n" + detail_table(subgroups))
    result = {
        "data": str(args.data), "split": args.split, "tolerance_mm": args.tolerance_mm,
        "threshold": args.threshold if args.operating_points is None else None,
        "operating_points": None if args.operating_points is None else str(args.operating_points),
        "dtype": args.dtype, "device": device_name(device), "code_version": code_version(),
        "command": " ".join(["python -m train.evaluate", *(argv if argv is not None else sys.argv[1:])]),
        "conventions": {
            "geometry": "prediction at 224, bilinear to the stored mask grid, metrics there with spacing_mm",
            "hd95": "max of the two directed 95th percentiles", "boundary_dice": f"NSD at {args.tolerance_mm:g} mm",
            "both_empty": "Dice = IoU = NSD = 1, distances 0",
            "one_empty": "Dice = IoU = NSD = 0, distances = image diagonal (mm)",
            "tables_3_to_5": "positive cases of the headline structure per dataset",
        },
        "table_structures": headline, "full_method": full,
        "methods": {m.name: {"checkpoints": [str(c) for c in m.checkpoints], "variants": m.variants,
                             "threshold": m.threshold, "domain_thresholds": m.domain_thresholds,
                             "efficiency": m.efficiency, "empty_cases": counts[m.name],
                             "negative_prompt_check": checks[m.name],
                             "unrelated_prompt_check": unrelated_check(m)} for m in methods},
        "summary_positive": positive_summary, "summary_all": all_summary, "summary_subgroups": subgroups,
        "branch_dice": branches,
    }
    atomic_write(args.out / "summary.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    atomic_write(args.out / "tables.md", lambda tmp: tmp.write_text(tables))
    print(tables)
    return result


if __name__ == "__main__":
    main()
