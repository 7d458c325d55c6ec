"""train/logit_report.py: pixel AUC against hand-worked cases, and the report of a model with known logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from freqmedclip.data.dataset import SegmentationDataset
from freqmedclip.data.format import StructureRecord, write_manifest, write_sample
from freqmedclip.modeling.model import SegOutput
from train import logit_report


def test_pixel_auc_hand_worked():
    # pairs (target, background): (0.35 vs 0.1) win, (0.35 vs 0.4) lose, (0.8 vs both) win -> 3 of 4
    assert logit_report.pixel_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # all tied: every pair counts one half
    assert logit_report.pixel_auc(np.ones(3), np.array([True, False, False])) == 0.5
    # one tie out of two pairs: (2 vs 1) win, (2 vs 2) half -> 0.75
    assert logit_report.pixel_auc(np.array([1.0, 2.0, 2.0]), np.array([0, 1, 0])) == 0.75
    assert math.isnan(logit_report.pixel_auc(np.zeros(4), np.zeros(4)))


def test_evenly_spaced_keeps_both_ends():
    assert logit_report.evenly_spaced(list(range(10)), 3) == [0, 4, 9]   # round(4.5) is 4 (banker's rounding)
    assert logit_report.evenly_spaced([5, 6], 4) == [5, 6]
    assert logit_report.evenly_spaced([5, 6, 7], 1) == [5]


class BrightnessModel(torch.nn.Module):
    """Fused logits +4 on pixels brighter than 0.5, -4 elsewhere; the frequency branch the opposite; no semantic."""

    def forward(self, image: torch.Tensor, prompts) -> SegOutput:
        fused = (image[:, :1] > 0.5).float() * 8 - 4                            # (B, 1, 224, 224)
        return SegOutput(fused, None, -fused)


@pytest.fixture(scope="module")
def blob_dataset(tmp_path_factory) -> Path:
    """One dataset, two positive cases: a bright square on a dark 112 x 112 image (an exact 2x resize to 224)."""
    root = tmp_path_factory.mktemp("blobs")
    records = []
    for subject, (top, left) in enumerate([(30, 40), (60, 20)]):
        image = np.full((112, 112), 40, np.uint8)
        mask = np.zeros((112, 112), bool)
        mask[top:top + 24, left:left + 30] = True
        image[mask] = 220
        sample_id = f"blob_{subject}"
        image_path, masks = write_sample(root, sample_id, image, {"blob": mask})
        records.append(StructureRecord(sample_id=sample_id, subject_id=f"s{subject}", dataset="blobs",
                                       modality="CT", structure="blob", prompts=["bright blob"],
                                       mask=masks["blob"], image=image_path, spacing_mm=(1.0, 1.0),
                                       original_size=(112, 112), source="", split="val"))
    write_manifest(root, records)
    return root


def test_report_of_a_model_with_known_logits(blob_dataset, tmp_path, monkeypatch):
    dataset = SegmentationDataset(blob_dataset, "val", train=False)
    report = logit_report.logit_statistics(BrightnessModel(), dataset, per_dataset=5)
    assert set(report) == {"blobs"} and report["blobs"]["cases"] == 2
    assert "semantic" not in report["blobs"]                                    # the model has no such branch
    fused, frequency = report["blobs"]["fused"], report["blobs"]["frequency"]
    # the bright square is the target, up to the resampled edge: inside +4, outside -4, perfect ranking
    assert fused["auc"] == pytest.approx(1.0, abs=0.01)
    assert fused["logit_inside"] == pytest.approx(4.0, abs=0.2)
    assert fused["logit_outside"] == pytest.approx(-4.0, abs=0.05)
    assert fused["max_probability"] == pytest.approx(1 / (1 + math.exp(-4)), rel=1e-6)
    assert frequency["auc"] == pytest.approx(0.0, abs=0.01)                    # ranks the target last
    assert frequency["logit_inside"] == pytest.approx(-4.0, abs=0.2)

    monkeypatch.setattr(logit_report, "load_ensemble", lambda paths, device: [BrightnessModel()])
    out = tmp_path / "report.json"
    logit_report.main(["some/checkpoint", "--data", str(blob_dataset), "--split", "val", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["report"]["blobs"]["fused"]["auc"] == pytest.approx(fused["auc"])
    assert saved["command"].startswith("python -m train.logit_report some/checkpoint")
