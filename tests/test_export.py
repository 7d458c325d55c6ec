"""train/export.py: fp16 publishing of a run's best checkpoint, with its mask check recorded and enforced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from freqmedclip.inference.checkpoint import load_checkpoint, save_checkpoint
from freqmedclip.data.dataset import SegmentationDataset
from freqmedclip.data.format import StructureRecord, write_manifest, write_sample
from _demo_support import decisive_model
from train import export


@pytest.fixture(scope="module")
def disc_data(tmp_path_factory) -> Path:
    """4 test images with a bright disc and the prompt "bright disc" (positive) or "dark ring" (negative)."""
    root = tmp_path_factory.mktemp("disc-data")
    rows, cols = np.mgrid[:64, :64]
    records = []
    for k in range(4):
        mask = (rows - 20 - 6 * k) ** 2 + (cols - 32) ** 2 < (6 + 2 * k) ** 2
        image = (np.random.default_rng(k).random((64, 64)) * 50 + mask * 180).astype(np.uint8)
        image_path, masks = write_sample(root, f"disc_{k}", image, {"disc": mask})
        common = {"sample_id": f"disc_{k}", "subject_id": f"s{k}", "dataset": "discs", "modality": "CT",
                  "image": image_path, "spacing_mm": (1.0, 1.0), "original_size": (64, 64), "source": "",
                  "split": "test"}
        records.append(StructureRecord(structure="disc", prompts=["bright disc"], mask=masks["disc"], **common))
        records.append(StructureRecord(structure="ring", prompts=["dark ring"], mask=None, **common))
    write_manifest(root, records)
    return root


@pytest.fixture(scope="module")
def run_dir(mini_backbone, tmp_path_factory) -> Path:
    """A training run directory as the trainer leaves it: best/ plus its history files."""
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "best", decisive_model(mini_backbone, seed=3), {"command": ["python", "-m", "train.train"]})
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return run


def test_fp16_export_records_its_check_and_keeps_the_training_metadata(run_dir, disc_data, tmp_path):
    dest = tmp_path / "published"
    check = export.main([str(run_dir), str(dest), "--data", str(disc_data)])

    with safe_open(str(dest / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_tensor(name).dtype for name in weights.keys()}
    assert dtypes == {torch.float16}
    assert (dest / "model.safetensors").stat().st_size < 0.55 * (run_dir / "best" / "model.safetensors").stat().st_size
    header = json.loads((dest / "config.json").read_text())
    assert header["metadata"]["command"] == ["python", "-m", "train.train"]
    recorded = header["metadata"]["export"]
    assert recorded["dtype"] == "fp16" and recorded["check"] == check
    assert recorded["command"].startswith("python -m train.export ")
    assert check["records"] == 8 and check["split"] == "test"
    assert check["max_abs_dice_change"] <= 0.005 and check["min_mask_dice_vs_original"] >= 0.95
    assert (dest / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    assert header["metadata"]["training_data"] == {   # the run records no data root: the checked data stand in
        "root": str(disc_data), "datasets": ["discs"],
        "licences": {"discs": "not recorded"}}
    assert not list(tmp_path.glob(".published*"))
    published = load_checkpoint(dest)                                  # loads back without flags, weights in fp32
    assert all(p.dtype == torch.float32 for p in published.parameters())


def test_compare_masks_sees_a_different_model(mini_backbone, disc_data):
    dataset = SegmentationDataset(disc_data, "test", train=False)
    model = decisive_model(mini_backbone, seed=3)
    same = export.compare_masks(model, model, dataset, "test")
    assert same["records_changed"] == 0 and same["max_abs_dice_change"] == 0.0
    assert same["min_mask_dice_vs_original"] == 1.0
    other = export.compare_masks(model, decisive_model(mini_backbone, seed=4), dataset, "test")
    assert other["records_changed"] > 0 and other["min_mask_dice_vs_original"] < 0.99


@pytest.mark.parametrize("limit", [("--max-dice-change", "-1"), ("--min-mask-dice", "1.01")],
                         ids=["dice-vs-ground-truth", "mask-vs-original"])
def test_a_failed_check_leaves_the_destination_untouched(run_dir, disc_data, tmp_path, limit):
    dest = tmp_path / "published"
    dest.mkdir()
    (dest / "keep.txt").write_text("previous release")
    with pytest.raises(SystemExit, match="left unchanged"):
        export.main([str(run_dir), str(dest), "--data", str(disc_data), *limit])
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".published*"))
