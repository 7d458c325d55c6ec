"""Paper figures (Fig. 2 contours, Fig. 3 per-stream activations) rendered as PNG and PDF on tiny phantom data."""

from __future__ import annotations

import json

import pytest
from _demo_support import decisive_model, make_checkpoints
from PIL import Image

from freqmedclip.inference.checkpoint import save_checkpoint
from freqmedclip.data.format import read_manifest
from freqmedclip.data.phantoms.generate import generate
from freqmedclip.demo.figures import main, positive_records, select_cases


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate(root, n_subjects=1, seed=0, workers=1)
    return root


def test_case_selection_is_deterministic_and_positive(phantoms):
    records = read_manifest(phantoms)
    chosen = select_cases(records, "test", per_dataset=2, seed=0)
    assert chosen == select_cases(records, "test", per_dataset=2, seed=0)
    assert chosen and all(r.positive and r.dataset == d for d, rs in chosen.items() for r in rs)
    assert all(len(rs) <= 2 for rs in chosen.values())


def test_figures_written_as_png_and_pdf(phantoms, tmp_path, mini_backbone, mini_backbone_dir):
    ours = make_checkpoints(tmp_path / "ours", mini_backbone, seeds=(0, 1))
    baseline = save_checkpoint(tmp_path / "baseline", decisive_model(mini_backbone, 3, variant="semantic_only"))
    out = tmp_path / "figures"
    summary = main(["--checkpoint", *map(str, ours), "--baseline", str(baseline), "--data", str(phantoms),
                    "--out", str(out), "--per-dataset", "2", "--backbone", f"local-dir:{mini_backbone_dir}"])
    for name in ("fig2_qualitative", "fig3_activations"):
        with Image.open(out / f"{name}.png") as image:
            assert image.width > 600 and image.height > 300
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    saved = json.loads((out / "figures.json").read_text())
    assert saved == json.loads(json.dumps(summary)) and saved["checkpoints"] == 2
    assert {case["dataset"] for case in saved["cases"]} == set(select_cases(read_manifest(phantoms), "test", 2, 0))
    assert all(0.0 <= case["dice_ours"] <= 1.0 and "dice_baseline" in case for case in saved["cases"])
    shares = saved["activation_shares"]
    assert shares["records"] == len(positive_records(read_manifest(phantoms), "test")) > 0
    for stream in ("semantic", "frequency"):
        assert 0.0 <= shares[stream]["inside"] <= 1.0 and 0.0 <= shares[stream]["contour"] <= 1.0


def test_activation_shares_on_a_hand_made_map_and_mask():
    import numpy as np

    from freqmedclip.demo.figures import activation_shares, contour_band

    target = np.zeros((224, 224), bool)
    target[100:124, 100:124] = True                      # 24 x 24 = 576 px
    band = contour_band(target, 3)
    # inside: the 3 outer rings (576 - 18 x 18 = 252 px); outside: within 3 px (Euclidean) of the square
    assert (band & target).sum() == 252 and not band[0, 0] and band[99, 110] and not band[96, 110]
    shares = activation_shares(target.astype(float), target)      # all mass on the target
    assert shares["inside"] == 1.0 and shares["contour"] == 252 / 576
    ring = np.zeros((224, 224))
    ring[90, 90:134] = 1.0                                # 10 px outside the top edge: neither inside nor on the band
    assert activation_shares(ring, target)["inside"] == 0.0 and activation_shares(ring, target)["contour"] == 0.0
    flat = activation_shares(np.ones((224, 224)), target)
    assert flat["inside"] == flat["uniform_inside"] == 576 / 224 ** 2
    assert flat["contour"] == flat["uniform_contour"] == band.mean()
