"""train/evaluate.py on a tiny non-square dataset: CSV, summary and tables; ensembles; CSV == metrics.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freqmedclip.evaluation import metrics
from freqmedclip.inference.checkpoint import load_ensemble
from freqmedclip.data.dataset import SegmentationDataset
from freqmedclip.data.format import StructureRecord, load_mask, write_manifest, write_sample
from freqmedclip.inference.predictor import Predictor
from freqmedclip.inference.preprocess import resize_to
from train import evaluate

SHAPE = (96, 80)                 # stored grid != 224: the 224 prediction is resampled onto it
SPACING = (0.9, 0.6)
DOMAINS = {"alpha": ("CT", "blob", "bright blob"), "beta": ("MRI", "ring", "dark ring")}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """2 datasets x 2 subjects x 1 image: 6 cases, 3 with the target present, 3 negative prompts."""
    root = tmp_path_factory.mktemp("tiny-data")
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    records = []
    for name, (modality, structure, prompt) in DOMAINS.items():
        other = next(v for k, v in DOMAINS.items() if k != name)
        for subject in range(2):
            sample_id = f"{name}_{subject}"
            radius = 8 + 6 * subject
            mask = (rows - 40) ** 2 + (cols - 30 - 10 * subject) ** 2 < radius**2
            image = (rng.random(SHAPE) * 60 + mask * 150).astype(np.uint8)
            present = not (name == "beta" and subject == 1)
            image_path, masks = write_sample(root, sample_id, image, {structure: mask} if present else {})
            common = {"sample_id": sample_id, "subject_id": f"{name}_s{subject}", "dataset": name, "modality": modality,
                      "image": image_path, "spacing_mm": SPACING, "original_size": SHAPE, "source": "", "split": "test"}
            metadata = {"pathology": "benign"} if subject == 0 else {"codes": {"pathology": "malignant"}}
            records.append(StructureRecord(structure=structure, prompts=[prompt], mask=masks.get(structure),
                                           metadata=metadata, **common))
            if subject == 0:                                                  # a cross-dataset negative prompt
                records.append(StructureRecord(structure=other[1], prompts=[other[2]], mask=None, **common))
    write_manifest(root, records)
    return root


@pytest.fixture(scope="module")
def evaluated(tiny_dataset, untrained_checkpoints, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval")
    result = evaluate.main(["--checkpoint", *map(str, untrained_checkpoints), "--name", "ens",
                            "--runs", f"single={untrained_checkpoints[0]}", "--data", str(tiny_dataset), "--split", "test",
                            "--out", str(out), "--device", "cpu", "--warmup", "0", "--n-boot", "200", "--save-masks"])
    return out, result


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_outputs_cover_every_case_and_method(evaluated):
    out, result = evaluated
    for name in ("ens", "single"):
        rows = read_rows(out / f"cases_{name}.csv")
        assert list(rows[0]) == list(evaluate.CSV_COLUMNS)
        assert len(rows) == 6 and {r["method"] for r in rows} == {name}
        assert sum(r["positive"] == "True" for r in rows) == 3
        assert all(r["gt_empty"] == str(r["positive"] == "False") for r in rows)
    assert result["methods"]["ens"]["efficiency"]["members"] == 2
    assert result["methods"]["single"]["efficiency"]["members"] == 1
    assert result["table_structures"] == {"alpha": "blob", "beta": "ring"}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["methods"].keys() == {"ens", "single"}
    group = next(r for r in saved["summary_all"]
                 if (r["method"], r["dataset"], r["structure"]) == ("ens", "alpha", "blob"))
    assert group["n_cases"] == 2 and group["n_subjects"] == 2
    assert group["dice_ci_lo"] <= group["dice_mean"] <= group["dice_ci_hi"]
    check = saved["methods"]["ens"]["negative_prompt_check"]
    assert check["n_gt_empty"] == 3 and 0.0 <= check["fraction"] <= 1.0
    counts = saved["methods"]["ens"]["empty_cases"]
    assert counts["n_cases"] == 6 and counts["n_gt_empty"] == 3
    assert counts["n_one_empty"] == counts["n_missed"] + counts["n_false_alarm"]

    tables = (out / "tables.md").read_text()
    for title in ("Table 3", "Table 4", "Table 5", "Table 6", "Negative prompts", "Empty-mask cases"):
        assert f"## {title}" in tables
    assert "| ens |" in tables and "| single |" in tables and "NSD @ 2 mm" in tables


def test_csv_numbers_equal_metrics_on_the_saved_masks(evaluated, tiny_dataset):
    out, _ = evaluated
    dataset = SegmentationDataset(tiny_dataset, "test", train=False)
    by_key = {(r.sample_id, r.structure): r for r in dataset.records}
    for row in read_rows(out / "cases_single.csv"):
        record = by_key[(row["sample_id"], row["structure"])]
        pred = np.asarray(Image.open(out / "masks" / "single" / f"{row['sample_id']}__{row['structure']}.png")) > 127
        gt = load_mask(tiny_dataset, record)
        assert pred.shape == gt.shape == SHAPE
        expected = metrics.case_metrics(pred, gt, SPACING, 2.0)
        for key, column in evaluate.METRIC_COLUMNS.items():
            assert float(row[column]) == expected[key], (row["sample_id"], column)
        assert float(row["pred_area"]) == pred.mean()
        assert row["pred_empty"] == str(not pred.any())


def test_ensemble_averages_member_probabilities(evaluated, tiny_dataset, untrained_checkpoints, mini_backbone):
    out, _ = evaluated
    dataset = SegmentationDataset(tiny_dataset, "test", train=False)
    item, record = dataset[0], dataset.records[0]
    models = load_ensemble(untrained_checkpoints, backbone=mini_backbone)
    with torch.no_grad():
        members = [torch.sigmoid(m(item["image"][None], [item["prompt"]]).logits) for m in models]
    probability = torch.stack(members).mean(0)                                  # (1, 1, 224, 224)
    expected = (resize_to(probability, SHAPE)[0, 0] >= 0.5).numpy()
    saved = np.asarray(Image.open(out / "masks" / "ens" / f"{record.sample_id}__{record.structure}.png")) > 127
    assert (saved != expected).sum() <= 2          # identical up to pixels at exactly p = 0.5 +- rounding
    single = np.asarray(Image.open(out / "masks" / "single" / f"{record.sample_id}__{record.structure}.png")) > 127
    assert (saved != single).any()                 # the second member changed the prediction


def test_branch_dice_is_each_streams_own_mask_scored_against_the_target(evaluated, tiny_dataset, untrained_checkpoints,
                                                                          mini_backbone):
    out, result = evaluated
    dataset = SegmentationDataset(tiny_dataset, "test", train=False)
    model = load_ensemble([untrained_checkpoints[0]], backbone=mini_backbone)[0]
    rows = read_rows(out / "cases_single.csv")
    for index, record in enumerate(dataset.records):
        item, gt = dataset[index], load_mask(tiny_dataset, record)
        with torch.no_grad():     # independent of the predictor: the model's own branch logits, sigmoid, threshold
            output = model(item["image"][None], [item["prompt"]])
        row = next(r for r in rows if (r["sample_id"], r["structure"]) == (record.sample_id, record.structure))
        for branch, logits in (("semantic", output.semantic_logits), ("frequency", output.frequency_logits)):
            mask = (resize_to(torch.sigmoid(logits), SHAPE)[0, 0] >= 0.5).numpy()
            assert float(row[f"{branch}_dice"]) == pytest.approx(metrics.dice(mask, gt), abs=0.02)
    positives = [r for r in rows if r["positive"] == "True" and r["dataset"] == "alpha"]
    expected = sum(float(r["semantic_dice"]) for r in positives) / len(positives)
    assert result["branch_dice"]["single"]["alpha"]["semantic"] == pytest.approx(expected)
    assert "## Branches" in (out / "tables.md").read_text()


def test_bad_runs_spec_is_refused(tiny_dataset, tmp_path):
    with pytest.raises(SystemExit, match="NAME=DIR"):
        evaluate.main(["--runs", "no-equals-sign", "--data", str(tiny_dataset), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        evaluate.main(["--data", str(tiny_dataset), "--out", str(tmp_path)])


def test_held_out_unrelated_phrases_are_asked_of_every_image(evaluated, tiny_dataset, untrained_checkpoints, mini_backbone):
    out, result = evaluated
    dataset = SegmentationDataset(tiny_dataset, "test", train=False)
    images = list(dict.fromkeys(r.image for r in dataset.records))
    check = result["methods"]["single"]["unrelated_prompt_check"]
    assert check["prompts"] == list(evaluate.HELD_OUT_UNRELATED_PROMPTS)
    assert check["n_pairs"] == len(images) * len(evaluate.HELD_OUT_UNRELATED_PROMPTS)
    # independent of the batched call: one prompt at a time through a fresh Predictor
    predictor = Predictor(load_ensemble([untrained_checkpoints[0]], backbone=mini_backbone), threshold=0.5)
    areas, by_dataset = [], {}
    for image in images:
        index = next(i for i, r in enumerate(dataset.records) if r.image == image)
        for prompt in evaluate.HELD_OUT_UNRELATED_PROMPTS:
            probability = predictor.predict_tensor(dataset[index]["image"][None], [prompt])["probability"]
            areas.append((probability >= 0.5).float().mean().item())
            by_dataset.setdefault(dataset.records[index].dataset, []).append(areas[-1])
    assert check["n_below_area"] == sum(a < evaluate.NEGATIVE_AREA for a in areas)
    assert check["mean_pred_area"] == pytest.approx(sum(areas) / len(areas), abs=1e-3)
    # the same pairs, split by the image's dataset: they add up to the pooled count
    assert set(check["per_dataset"]) == set(by_dataset) and len(by_dataset) > 1
    for name, expected in by_dataset.items():
        entry = check["per_dataset"][name]
        assert entry["n_pairs"] == len(expected)
        assert entry["n_below_area"] == sum(a < evaluate.NEGATIVE_AREA for a in expected)
    assert sum(e["n_below_area"] for e in check["per_dataset"].values()) == check["n_below_area"]
    assert "Unrelated phrases (held out)" in (out / "tables.md").read_text()


def test_subgroups_split_positive_cases_by_metadata_even_one_level_down(evaluated):
    out, result = evaluated
    rows = {r["sample_id"]: r for r in read_rows(out / "cases_single.csv") if r["positive"] == "True"}
    groups = {(g["dataset"], g["structure"]): g for g in result["summary_subgroups"] if g["method"] == "single"}
    # alpha: subject 0 benign, subject 1 malignant (nested under "codes"); beta: only subject 0 has the target
    assert set(groups) == {("alpha", "blob, pathology = benign"), ("alpha", "blob, pathology = malignant"),
                           ("beta", "ring, pathology = benign")}
    assert groups[("alpha", "blob, pathology = malignant")]["n_cases"] == 1
    assert groups[("alpha", "blob, pathology = malignant")]["dice_mean"] == pytest.approx(float(rows["alpha_1"]["dice"]))
    assert "## Subgroups" in (out / "tables.md").read_text()
