"""train/operating_point.py: the validation sweep's numbers by hand, the choice rule, the shipped file, and
train.evaluate thresholding each method at its chosen point."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from freqmedclip.data.dataset import SegmentationDataset
from freqmedclip.data.format import StructureRecord, write_manifest, write_sample
from freqmedclip.inference.checkpoint import OPERATING_POINT_FILE, load_ensemble, read_operating_point
from freqmedclip.inference.predictor import Predictor
from train import evaluate, operating_point
from train.operating_point import CheckpointMaps, SweepPoint, choose, sweep

SIDE = 224
PIXELS = SIDE * SIDE


def make_dataset(root: Path, split: str, domains: tuple[str, ...] = ("a",)) -> Path:
    """Per domain d ("a": structure "blob", "b": "spot"): image d_0 with a 10x10 target and an absent "ring"
    prompt; image d_1 with the target only."""
    records = []
    for domain in domains:
        structure = {"a": "blob", "b": "spot"}[domain]
        for index in range(2):
            mask = np.zeros((SIDE, SIDE), bool)
            mask[20:30, 20:30] = True
            image = (np.random.default_rng(index).random((SIDE, SIDE)) * 60 + mask * 150).astype(np.uint8)
            image_path, masks = write_sample(root, f"{domain}_{index}", image, {structure: mask})
            common = {"sample_id": f"{domain}_{index}", "subject_id": f"{domain}s{index}", "dataset": domain,
                      "modality": "CT", "image": image_path, "spacing_mm": (1.0, 1.0),
                      "original_size": (SIDE, SIDE), "source": "", "split": split}
            records.append(StructureRecord(structure=structure, prompts=[f"bright {structure}"],
                                           mask=masks[structure], **common))
            if index == 0:
                records.append(StructureRecord(structure="ring", prompts=["dark ring"], mask=None, **common))
    write_manifest(root, records)
    return root


@pytest.fixture(scope="module")
def val_dataset(tmp_path_factory) -> SegmentationDataset:
    return SegmentationDataset(make_dataset(tmp_path_factory.mktemp("val-data"), "val"), "val", train=False)


def region(rows: slice, cols: slice, value: float) -> torch.Tensor:
    out = torch.zeros(SIDE, SIDE)
    out[rows, cols] = value
    return out


def test_sweep_numbers_by_hand(val_dataset):
    # records: (a_0 blob), (a_0 ring, absent), (a_1 blob)
    target = region(slice(20, 30), slice(20, 30), 0.8)                 # the 100 target pixels at 0.8
    halo = region(slice(30, 40), slice(20, 30), 0.4)                   # 100 more pixels beside them at 0.4
    absent = region(slice(100, 140), slice(100, 125), 0.6)             # 1000 pixels (2.0 % of the image) at 0.6
    records = torch.stack([target + halo, absent, region(slice(20, 30), slice(20, 25), 0.8)])
    phrase = torch.zeros(2, 6, SIDE, SIDE)
    phrase[0, 0, :30, :30] = 0.45                                      # 900 px = 1.8 %: one pair above 1 % at t < 0.45
    maps = CheckpointMaps(records.half(), phrase.half())
    points = {p.threshold: p for p in sweep([maps], val_dataset, {"a": "blob"}, [0.3, 0.5, 0.7])}
    # t = 0.3: a_0 predicts 200 px, 100 overlap -> 2*100/300; a_1 predicts 50 inside the 100 -> 2*50/150
    assert points[0.3].dice["a"] == pytest.approx((2 * 100 / 300 + 2 * 50 / 150) / 2, abs=1e-6)
    assert points[0.5].dice["a"] == pytest.approx((1.0 + 2 * 50 / 150) / 2, abs=1e-6)
    assert points[0.5].avg_dice == points[0.5].dice["a"]
    # the absent record is painted (2 % >= 1 %) until the threshold passes 0.6
    assert [points[t].absent_empty for t in (0.3, 0.5, 0.7)] == [0.0, 0.0, 1.0]
    # 12 (image, phrase) pairs, one of them painted while t <= 0.45
    assert [points[t].phrases_empty for t in (0.3, 0.5, 0.7)] == pytest.approx([11 / 12, 1.0, 1.0])


def test_per_domain_thresholds_by_hand(tmp_path):
    # domain a: a confident target with a halo at 0.4 (best from 0.5 up); domain b: a faint target at 0.35 (found
    # only at 0.3). One painted phrase pair on a's first image while t <= 0.45.
    dataset = SegmentationDataset(make_dataset(tmp_path, "val", ("a", "b")), "val", train=False)
    assert [(r.dataset, r.structure) for r in dataset.records] == [("a", "blob"), ("a", "ring"), ("a", "blob"),
                                                                    ("b", "spot"), ("b", "ring"), ("b", "spot")]
    confident = region(slice(20, 30), slice(20, 30), 0.8)
    halo = region(slice(30, 40), slice(20, 30), 0.4)
    faint = region(slice(20, 30), slice(20, 30), 0.35)
    zero = torch.zeros(SIDE, SIDE)
    records = torch.stack([confident + halo, zero, confident, faint, zero, faint])
    phrase = torch.zeros(4, 6, SIDE, SIDE)
    phrase[0, 0, :30, :30] = 0.45
    points = sweep([CheckpointMaps(records.half(), phrase.half())], dataset, {"a": "blob", "b": "spot"},
                   [0.3, 0.5, 0.7])
    by = {p.threshold: p for p in points}
    # single thresholds: 0.3 gives a (2*100/300 + 1) / 2 and b 1; 0.5 and 0.7 give a 1 and b 0
    assert [by[t].avg_dice for t in (0.3, 0.5, 0.7)] == pytest.approx([((2 / 3 + 1) / 2 + 1) / 2, 0.5, 0.5])
    # phrase pairs: 23 of 24 empty at 0.3 overall, but 11 of a's 12
    assert by[0.3].phrases_empty == pytest.approx(23 / 24)
    assert by[0.3].phrases_empty_by == pytest.approx({"a": 11 / 12, "b": 1.0})
    assert by[0.3].phrases_count_by == {"a": 12, "b": 12} and by[0.3].absent_count_by == {"a": 1, "b": 1}
    single, met = choose(points)
    assert (single.threshold, met) == (0.3, True)
    per_domain = operating_point.choose_per_domain(points)
    # a: 0.3 fails its own phrases (11/12 < 0.95); 0.5 and 0.7 tie at Dice 1, nearest 0.5 wins. b: only 0.3 finds it
    assert per_domain["thresholds"] == {"a": 0.5, "b": 0.3}
    assert per_domain["avg_dice"] == pytest.approx(1.0)
    assert (per_domain["absent_empty"], per_domain["phrases_empty"], per_domain["meets_min_empty"]) == (1.0, 1.0, True)
    assert operating_point.adopt_per_domain(per_domain, single)
    # not adopted when it does not beat the single threshold's Avg Dice, or when a domain misses the target
    assert not operating_point.adopt_per_domain(dict(per_domain, avg_dice=single.avg_dice), single)
    assert not operating_point.adopt_per_domain(dict(per_domain, meets_min_empty=False), single)


def test_an_ensemble_is_swept_on_its_members_mean(val_dataset):
    loud = region(slice(20, 30), slice(20, 30), 1.0)
    quiet = region(slice(20, 30), slice(20, 30), 0.2)
    zeros = torch.zeros(2, 6, SIDE, SIDE).half()
    members = [CheckpointMaps(torch.stack([loud, loud * 0, loud]).half(), zeros),
               CheckpointMaps(torch.stack([quiet, quiet * 0, quiet]).half(), zeros)]
    points = sweep(members, val_dataset, {"a": "blob"}, [0.55, 0.65])  # mean 0.6 on the target
    assert [p.dice["a"] for p in points] == pytest.approx([1.0, 0.0])


def point(threshold: float, dice: float, absent: float, phrases: float) -> SweepPoint:
    return SweepPoint(threshold, {"a": dice}, dice, absent, phrases)


def test_choice_is_the_best_dice_among_points_that_leave_enough_empty():
    points = [point(0.3, 0.80, 0.90, 0.99), point(0.5, 0.75, 0.96, 0.97), point(0.7, 0.70, 0.99, 0.99)]
    assert choose(points, 0.95) == (points[1], True)
    # when none leaves enough empty: the largest smaller share, not the best Dice
    assert choose(points, 0.995) == (points[2], False)
    # equal Dice: the threshold nearest 0.5 wins, whichever side it is on
    tied = [point(0.3, 0.7, 1.0, 1.0), point(0.6, 0.7, 1.0, 1.0), point(0.8, 0.7, 1.0, 1.0)]
    assert choose(tied, 0.95) == (tied[1], True)


def test_maps_equal_one_prompt_at_a_time_and_the_shipped_file_reads_back(val_dataset, untrained_checkpoints,
                                                                            mini_backbone, tmp_path):
    first_ckpt, second_ckpt = untrained_checkpoints
    out, ship = tmp_path / "points.json", tmp_path / "set" / OPERATING_POINT_FILE
    result = operating_point.main(["--data", str(val_dataset.root), "--out", str(out), "--device", "cpu",
                                   "--thresholds", "0.2", "0.5", "0.8",
                                   "--runs", f"ens={first_ckpt},{second_ckpt}", f"one={first_ckpt}",
                                   "--ship", f"ens={ship}", "--per-domain"])
    assert json.loads(out.read_text()) == result and out.with_suffix(".md").is_file()
    for name in ("ens", "one"):
        entry = result["methods"][name]
        points = [SweepPoint(**p) for p in entry["sweep"]]
        assert [p.threshold for p in points] == [0.2, 0.5, 0.8]
        assert (choose(points)[0].threshold, choose(points)[1]) == (entry["threshold"], entry["meets_min_empty"])
        # one domain: its own choice is the single one, which it cannot beat, so it is not adopted
        assert entry["per_domain"]["thresholds"] == {"a": entry["threshold"]} and not entry["per_domain"]["adopted"]
    shipped = read_operating_point(ship.parent)
    assert shipped["threshold"] == result["methods"]["ens"]["threshold"] and shipped["split"] == "val"
    assert "domain_thresholds" not in shipped

    # independent of the batched call: record 0 and image 1's third phrase through a fresh single-model Predictor
    maps = operating_point.checkpoint_maps(first_ckpt, val_dataset, torch.device("cpu"), "fp32", {})
    predictor = Predictor(load_ensemble([first_ckpt], backbone=mini_backbone))
    first, second = val_dataset[0], val_dataset[2]
    expected = predictor.predict_tensor(first["image"][None], [first["prompt"]])["probability"][0, 0]
    assert torch.allclose(maps.records[0].float(), expected, atol=2e-3)
    phrase = operating_point.VALIDATION_UNRELATED_PROMPTS[2]
    expected = predictor.predict_tensor(second["image"][None], [phrase])["probability"][0, 0]
    assert torch.allclose(maps.phrases[1, 2].float(), expected, atol=2e-3)


def test_the_test_split_is_refused(val_dataset, untrained_checkpoints, tmp_path):
    with pytest.raises(SystemExit):
        operating_point.main(["--data", str(val_dataset.root), "--split", "test", "--out", str(tmp_path / "x.json"),
                              "--runs", f"one={untrained_checkpoints[0]}"])


@pytest.mark.parametrize("text, problem", [("{not json", "not an operating point"),
                                           ('{"split": "val"}', "not an operating point"),
                                           ('{"threshold": 1.5}', "strictly between 0 and 1"),
                                           ('{"threshold": true}', "strictly between 0 and 1"),
                                           ('{"threshold": 0.5, "domain_thresholds": {"lgg": 0}}', "domain_thresholds"),
                                           ('{"threshold": 0.5, "domain_thresholds": [0.4]}', "domain_thresholds")])
def test_a_bad_operating_point_file_is_named(tmp_path, text, problem):
    assert read_operating_point(tmp_path) is None                      # no file: no operating point
    (tmp_path / OPERATING_POINT_FILE).write_text(text)
    with pytest.raises(ValueError, match=problem) as error:
        read_operating_point(tmp_path)
    assert OPERATING_POINT_FILE in str(error.value)


def test_evaluate_thresholds_each_method_at_its_operating_point(tmp_path, untrained_checkpoints, mini_backbone):
    data = make_dataset(tmp_path / "test-data", "test")
    first_ckpt, second_ckpt = untrained_checkpoints
    chosen = {"ens": (0.3, [first_ckpt, second_ckpt]), "one": (0.7, [first_ckpt])}
    per_domain = {"ens": {"adopted": True, "thresholds": {"a": 0.6}},      # used: a's images get 0.6
                  "one": {"adopted": False, "thresholds": {"a": 0.2}}}     # chosen but not adopted: ignored
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"methods": {n: {"threshold": t, "checkpoints": [str(c) for c in cs],
                                                  "per_domain": per_domain[n]}
                                              for n, (t, cs) in chosen.items()}}))
    applied = {"ens": 0.6, "one": 0.7}
    runs = [f"{n}={','.join(map(str, cs))}" for n, (_, cs) in chosen.items()]
    common = ["--data", str(data), "--split", "test", "--device", "cpu", "--warmup", "0", "--n-boot", "20"]
    result = evaluate.main([*common, "--out", str(tmp_path / "eval"), "--runs", *runs, "--operating-points",
                            str(points)])
    dataset = SegmentationDataset(data, "test", train=False)
    item = dataset[0]
    for name, (threshold, members) in chosen.items():
        assert result["methods"][name]["threshold"] == threshold
        probability = Predictor(load_ensemble(members, backbone=mini_backbone)).predict_tensor(
            item["image"][None], [item["prompt"]])["probability"]
        with open(tmp_path / "eval" / f"cases_{name}.csv", newline="") as handle:
            row = next(r for r in csv.DictReader(handle) if r["sample_id"] == item["sample_id"])
        area = (probability >= applied[name]).float().mean().item()
        assert float(row["pred_area"]) == pytest.approx(area, abs=1e-6)
        if applied[name] != threshold:     # the domain's threshold made a difference on this record
            assert abs(area - (probability >= threshold).float().mean().item()) > 1e-3
    assert result["methods"]["ens"]["domain_thresholds"] == {"a": 0.6}
    assert result["methods"]["one"]["domain_thresholds"] == {}
    tables = (tmp_path / "eval" / "tables.md").read_text()
    assert "Thresholds chosen on validation" in tables and "ens a 0.6 (else 0.3); one 0.7" in tables

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"methods": {"ens": {"threshold": 0.3, "checkpoints": [str(first_ckpt)]}}}))
    with pytest.raises(SystemExit, match="was chosen for"):
        evaluate.main([*common, "--out", str(tmp_path / "e2"), "--runs", runs[0], "--operating-points", str(wrong)])
    with pytest.raises(SystemExit, match="no operating point for 'one'"):
        evaluate.main([*common, "--out", str(tmp_path / "e3"), "--runs", runs[1], "--operating-points", str(wrong)])
