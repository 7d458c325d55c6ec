"""Paper figures from checkpoints and a dataset root, as PNG and PDF (matplotlib, Agg, no display).

    python -m freqmedclip.demo.figures --checkpoint DIR [DIR ...] --data DIR --out DIR [--baseline DIR [DIR ...]]
                                  [--split test] [--per-dataset 1] [--backbone local-dir:PATH|hf-hub:ID]

* Fig. 2 (``fig2_qualitative``): per dataset (rows), ground-truth contour in green, ours (the ensemble mean
  mask) in red and the baseline in blue, with each case's Dice in the title.
* Fig. 3 (``fig3_activations``): per dataset, the image, the Grad-CAM of the semantic stream (S1), of the
  frequency stream (F3), and the fused probability sigma(L), all for the same prompt.

* Fig. 3 made measurable (``activation_shares`` in ``figures.json``, printed): over every positive record of the
  split, the share of each stream's Grad-CAM mass (the raw map, logit units, >= 0) inside the ground-truth target
  and within a thin band around its contour (``--band-px`` 3 at 224, both sides), against what a uniform map
  would score (the target's and the band's area fractions). The paper says semantic activations cover coarse
  regions and frequency activations boundaries: a frequency contour share above the semantic one says the latter.
  Records whose prediction is empty (nothing to explain) are skipped and counted.

Cases are positive records (the structure is present) of ``--split`` (any split when a dataset has none there),
drawn with ``--seed`` from the records sorted by sample id, so a rerun picks the same cases. ``figures.json``
lists them with their Dice. Images go through the Predictor exactly as in the demo (8-bit: / 255).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import ndimage

from freqmedclip.inference import Predictor, load_clip_backbone, load_ensemble
from freqmedclip.inference.checkpoint import atomic_write
from freqmedclip.data.format import StructureRecord, load_image, load_mask, read_manifest
from freqmedclip.demo.render import resize_map
from freqmedclip.evaluation.metrics import dice

GT_COLOUR, OURS_COLOUR, BASELINE_COLOUR = "#00c800", "#e61e1e", "#2860ff"


def select_cases(records: Sequence[StructureRecord], split: str, per_dataset: int,
                 seed: int) -> dict[str, list[StructureRecord]]:
    """Up to ``per_dataset`` positive records per dataset, deterministic for a seed."""
    by_dataset: dict[str, list[StructureRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.sample_id + "/" + r.structure):
        if record.positive:
            by_dataset[record.dataset].append(record)
    chosen = {}
    for dataset in sorted(by_dataset):
        pool = [r for r in by_dataset[dataset] if r.split == split] or by_dataset[dataset]
        rng = np.random.default_rng([seed, len(chosen)])
        picks = sorted(rng.choice(len(pool), size=min(per_dataset, len(pool)), replace=False))
        chosen[dataset] = [pool[i] for i in picks]
    return chosen


def _save(figure: Figure, out: Path, name: str) -> list[Path]:
    paths = []
    for suffix in (".png", ".pdf"):
        path = out / f"{name}{suffix}"
        atomic_write(path, lambda tmp, suffix=suffix: figure.savefig(tmp, format=suffix[1:], dpi=200,
                                                                    bbox_inches="tight"))
        paths.append(path)
    return paths


def _contour(axis, mask: np.ndarray, colour: str, width: float = 1.4) -> None:
    if mask.any():
        axis.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width)


def figure_qualitative(cases: list[dict], has_baseline: bool, columns: int) -> Figure:
    """Fig. 2: rows = datasets, columns = cases; contours GT green, ours red, baseline blue."""
    datasets = list(dict.fromkeys(case["dataset"] for case in cases))
    figure = Figure(figsize=(2.6 * columns, 2.8 * len(datasets) + 0.4))
    axes = figure.subplots(len(datasets), columns, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for row, dataset in enumerate(datasets):
        for column, case in enumerate(c for c in cases if c["dataset"] == dataset):
            axis = axes[row, column]
            axis.imshow(case["image"], cmap="gray")
            _contour(axis, case["gt"], GT_COLOUR)
            _contour(axis, case["ours"], OURS_COLOUR)
            title = f"{dataset}: {case['prompt']}\nDice ours {case['dice_ours']:.2f}"
            if has_baseline:
                _contour(axis, case["baseline"], BASELINE_COLOUR)
                title += f" | baseline {case['dice_baseline']:.2f}"
            axis.set_title(title, fontsize=8)
    handles = [Line2D([], [], color=GT_COLOUR, label="ground truth"),
               Line2D([], [], color=OURS_COLOUR, label="FreqMedCLIP")]
    if has_baseline:
        handles.append(Line2D([], [], color=BASELINE_COLOUR, label="baseline"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
    figure.subplots_adjust(bottom=0.4 / (2.8 * len(datasets) + 0.4) + 0.02)
    return figure


def figure_activations(cases: list[dict]) -> Figure:
    """Fig. 3: rows = datasets; image, semantic Grad-CAM, frequency Grad-CAM, fused sigma(L); colour bars below."""
    titles = ("image", "semantic stream\n(Grad-CAM on S1)", "frequency stream\n(Grad-CAM on F3)", "fused\nσ(L)")
    colormaps = (None, "jet", "jet", "viridis")
    figure = Figure(figsize=(10.4, 2.6 * len(cases) + 0.6))
    grid = figure.add_gridspec(len(cases) + 1, 4, height_ratios=[1.0] * len(cases) + [0.06], hspace=0.08,
                               wspace=0.04)
    for row, case in enumerate(cases):
        maps = (None, case["cam_semantic"], case["cam_frequency"], case["probability"])
        for column in range(4):
            axis = figure.add_subplot(grid[row, column])
            axis.set_axis_off()
            axis.imshow(case["image"], cmap="gray")
            if maps[column] is not None:
                axis.imshow(maps[column], cmap=colormaps[column], vmin=0, vmax=1, alpha=0.5)
            if row == 0:
                axis.set_title(titles[column], fontsize=9)
            if column == 0:
                axis.text(-0.04, 0.5, f"{case['dataset']}: {case['prompt']}", transform=axis.transAxes,
                          rotation=90, va="center", ha="right", fontsize=8)
    for column in range(1, 4):
        scale = ScalarMappable(Normalize(0, 1), colormaps[column])
        figure.colorbar(scale, cax=figure.add_subplot(grid[len(cases), column]), orientation="horizontal",
                        ticks=[0.0, 0.5, 1.0])
    return figure


def contour_band(target: np.ndarray, band_px: float) -> np.ndarray:
    """(H, W) bool: pixels at most ``band_px`` from the target's contour, on either side (inside: distance to the
    nearest outside pixel; outside: to the nearest inside pixel)."""
    inside = ndimage.distance_transform_edt(target)
    outside = ndimage.distance_transform_edt(~target)
    return (target & (inside <= band_px)) | (~target & (outside <= band_px))


def activation_shares(cam: np.ndarray, target: np.ndarray, band_px: float = 3.0) -> dict[str, float]:
    """cam: (H, W) >= 0; target: (H, W) bool, same grid. Shares of the map's mass inside the target and in the
    contour band (``band_px`` at this grid), and the same for a uniform map (the area fractions)."""
    cam = np.clip(np.asarray(cam, dtype=np.float64), 0.0, None)
    band = contour_band(target, band_px)
    total = cam.sum()
    share = (lambda region: float(cam[region].sum() / total)) if total > 0 else (lambda region: float("nan"))
    return {"inside": share(target), "contour": share(band), "uniform_inside": float(target.mean()),
            "uniform_contour": float(band.mean())}


def positive_records(records: Sequence[StructureRecord], split: str) -> list[StructureRecord]:
    """The positive records of ``split`` sorted by id (all positive records when the split has none)."""
    positives = sorted((r for r in records if r.positive), key=lambda r: r.sample_id + "/" + r.structure)
    return [r for r in positives if r.split == split] or positives


def measure_shares(predictor: Predictor, root: Path, records: Sequence[StructureRecord],
                   band_px: float = 3.0) -> dict:
    """Mean :func:`activation_shares` per stream over ``records`` (positive ones), at the model's 224 grid, overall
    and per dataset; the Grad-CAM explains each record's first prompt."""
    per_stream: dict[str, list[dict]] = defaultdict(list)
    per_dataset: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    skipped = 0
    for record in records:
        tensor, _ = predictor.prepare(load_image(root, record))
        prompt = record.prompts[0]
        cams = predictor.predict_tensor(tensor, [prompt], explain=prompt)["gradcam"]
        if cams.empty:
            skipped += 1
            continue
        size = tuple(tensor.shape[-2:])
        target = resize_map(load_mask(root, record).astype(bool), size)
        for stream in ("semantic", "frequency"):
            raw = getattr(cams, f"{stream}_logit")
            if raw is not None:
                shares = activation_shares(raw, target, band_px * size[0] / 224)
                per_stream[stream].append(shares)
                per_dataset[record.dataset][stream].append(shares)

    def mean(rows: list[dict]) -> dict[str, float]:
        return {key: round(float(np.nanmean([r[key] for r in rows])), 4) for key in rows[0]} if rows else {}

    return {"band_px_at_224": band_px, "records": len(records), "explained": len(records) - skipped,
            "skipped_empty_prediction": skipped, **{stream: mean(rows) for stream, rows in per_stream.items()},
            "per_dataset": {d: {s: mean(rows) for s, rows in streams.items()} for d, streams in
                            sorted(per_dataset.items())}}


def render_figures(predictor: Predictor, baseline: Predictor | None, root: Path, out: Path, split: str = "test",
                   per_dataset: int = 1, seed: int = 0, band_px: float = 3.0) -> dict:
    """Predict the selected cases, write Fig. 2 and Fig. 3 (PNG + PDF) and figures.json (with the activation
    shares over the split's positive records) to ``out``."""
    manifest = read_manifest(root)
    chosen = select_cases(manifest, split, per_dataset, seed)
    if not chosen:
        raise ValueError(f"{root} has no positive record (a structure present in an image) to show")
    cases = []
    for dataset, records in chosen.items():
        for record in records:
            image, gt = load_image(root, record), load_mask(root, record)
            prompt = record.prompts[0]
            ours = predictor.predict(image, prompt)
            case = {"dataset": dataset, "sample_id": record.sample_id, "structure": record.structure,
                    "prompt": prompt, "image": image, "gt": gt, "ours": ours.mask, "probability": ours.probability,
                    "dice_ours": dice(ours.mask, gt)}
            if baseline is not None:
                case["baseline"] = baseline.predict(image, prompt).mask
                case["dice_baseline"] = dice(case["baseline"], gt)
            cases.append(case)
    first = [next(c for c in cases if c["dataset"] == d) for d in chosen]
    for case in first:
        tensor, size = predictor.prepare(case["image"])
        semantic, frequency = predictor.predict_tensor(tensor, [case["prompt"]], explain=case["prompt"])["gradcam"]
        case["cam_semantic"], case["cam_frequency"] = (None if m is None else resize_map(m.astype(np.float32), size)
                                                       for m in (semantic, frequency))
    out.mkdir(parents=True, exist_ok=True)
    files = _save(figure_qualitative(cases, baseline is not None, per_dataset), out, "fig2_qualitative")
    files += _save(figure_activations(first), out, "fig3_activations")
    keys = ("dataset", "sample_id", "structure", "prompt", "dice_ours", "dice_baseline")
    positives = positive_records(manifest, split)
    summary = {"cases": [{k: case[k] for k in keys if k in case} for case in cases],
               "files": [str(f) for f in files], "checkpoints": len(predictor.models), "split": split,
               "activation_shares": measure_shares(predictor, root, positives, band_px)}
    atomic_write(out / "figures.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs="+", required=True, help="FreqMedCLIP checkpoint folders (ensemble)")
    parser.add_argument("--baseline", nargs="+", default=None, help="checkpoint folders of the baseline (blue)")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (manifest.jsonl, images/, masks/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--per-dataset", type=int, default=1, help="cases per dataset in Fig. 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default=None, help="local-dir:PATH | hf-hub:ID (default: the checkpoints')")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--band-px", type=float, default=3.0, help="contour band half-width in px at 224")
    args = parser.parse_args(argv)
    backbone = load_clip_backbone(args.backbone) if args.backbone else None
    models = load_ensemble(args.checkpoint, backbone, device=args.device)
    predictor = Predictor(models, device=args.device)
    baseline = None
    if args.baseline:
        baseline = Predictor(load_ensemble(args.baseline, backbone or models[0].clip_backbone, device=args.device),
                             device=args.device)
    summary = render_figures(predictor, baseline, args.data, args.out, args.split, args.per_dataset, args.seed,
                             args.band_px)
    for case in summary["cases"]:
        print(f"{case['dataset']:8s} {case['sample_id']} {case['prompt']!r}: Dice ours {case['dice_ours']:.3f}"
              + (f", baseline {case['dice_baseline']:.3f}" if "dice_baseline" in case else ""))
    shares = summary["activation_shares"]
    print(f"Grad-CAM mass over {shares['explained']} of {shares['records']} positive {args.split} records "
          f"({shares['skipped_empty_prediction']} empty predictions skipped), contour band {args.band_px:g} px:")
    for stream in ("semantic", "frequency"):
        if shares.get(stream):
            s = shares[stream]
            print(f"  {stream:9s} inside target {s['inside']:.3f} (uniform {s['uniform_inside']:.3f}), "
                  f"on the contour band {s['contour']:.3f} (uniform {s['uniform_contour']:.3f})")
    print("\n".join(summary["files"]))
    return summary


if __name__ == "__main__":
    main()
