"""SegmentationDataset: paired augmentation, item shapes/dtypes, prompt policy, balanced sampling."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from freqmedclip.data.dataset import Augment, SegmentationDataset, sampling_weights
from freqmedclip.data.format import StructureRecord, write_manifest, write_sample

PROMPTS = ["lesion", "the lesion", "a lesion in the image", "suspicious lesion"]


def _mask(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    # An asymmetric shape (disc + off-centre bar) so flips and rotations are detectable.
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.12 * size) ** 2
    mask[int(0.1 * size) : int(0.2 * size), int(0.1 * size) : int(0.6 * size)] = True
    return mask


def _write_root(root, size: int = 224, n: int = 4) -> list[StructureRecord]:
    """Images whose three channels encode the mask (foreground 255, background 0)."""
    records = []
    for i in range(n):
        mask = _mask(size, i)
        image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
        image_rel, masks = write_sample(root, f"s{i}", image, {"lesion": mask})
        for structure, rel in (("lesion", masks["lesion"]), ("nodule", None)):
            records.append(
                StructureRecord(
                    sample_id=f"s{i}",
                    subject_id=f"p{i}",
                    dataset="toy",
                    modality="CT",
                    structure=structure,
                    prompts=PROMPTS if structure == "lesion" else ["lung nodule", "pulmonary nodule"],
                    image=image_rel,
                    mask=rel,
                    spacing_mm=(0.5, 0.8),
                    original_size=(size, size),
                    source="",
                    split="train",
                )
            )
    write_manifest(root, records)
    return records


def test_item_shapes_dtypes_and_eval_is_identity(tmp_path):
    records = _write_root(tmp_path)
    ds = SegmentationDataset(tmp_path, "train", train=False)
    assert len(ds) == len(records)
    item = ds[0]
    assert set(item) == {
        "image",
        "mask",
        "prompt",
        "spacing",
        "sample_id",
        "subject_id",
        "dataset",
        "structure",
        "index",
    }
    assert item["image"].shape == (3, 224, 224) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 224, 224) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(item["image"][0], item["mask"][0])
    assert item["spacing"].tolist() == pytest.approx([0.5, 0.8])
    assert (
        item["prompt"],
        item["sample_id"],
        item["subject_id"],
        item["dataset"],
        item["structure"],
        item["index"],
    ) == ("lesion", "s0", "p0", "toy", "lesion", 0)
    assert ds[1]["mask"].sum() == 0 and ds[1]["prompt"] == "lung nodule"
    assert {ds[0]["prompt"] for _ in range(20)} == {"lesion"}


def test_geometric_augmentation_is_identical_for_image_and_mask(tmp_path):
    _write_root(tmp_path)
    ds = SegmentationDataset(tmp_path, "train", train=True, augment=Augment.geometric_only())
    original = torch.from_numpy(_mask(224, 0)).float()
    changed = 0
    for seed in range(12):
        torch.manual_seed(seed)
        item = ds[0]
        assert torch.equal((item["image"][0] > 0.5).float(), item["mask"][0]), f"seed {seed}"
        assert torch.equal(item["image"][0], item["image"][2])
        changed += not torch.equal(item["mask"][0], original)
        assert 0.7 * original.sum() < item["mask"].sum() < 1.4 * original.sum()
    assert changed >= 10


def test_flip_only_matches_numpy_flip(tmp_path):
    _write_root(tmp_path)
    aug = replace(Augment.geometric_only(), hflip=1.0, vflip=0.0, rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0)
    item = SegmentationDataset(tmp_path, "train", train=True, augment=aug)[0]
    assert np.array_equal(item["mask"][0].numpy().astype(bool), _mask(224, 0)[:, ::-1])
    assert np.allclose(item["image"][0].numpy(), _mask(224, 0)[:, ::-1], atol=1e-4)


def test_intensity_jitter_touches_image_only(tmp_path):
    _write_root(tmp_path)
    geometric = SegmentationDataset(tmp_path, "train", train=True, augment=Augment.geometric_only())
    full = SegmentationDataset(tmp_path, "train", train=True, augment=Augment(noise_std=0.05))
    torch.manual_seed(7)
    a = geometric[0]
    torch.manual_seed(7)
    b = full[0]
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["spacing"], b["spacing"])
    assert not torch.equal(a["image"], b["image"])
    assert b["image"].min() >= 0 and b["image"].max() <= 1
    fg, bg = b["image"][0][b["mask"][0] > 0], b["image"][0][b["mask"][0] == 0]
    assert fg.mean() - bg.mean() > 0.5


def test_training_samples_all_prompt_phrasings(tmp_path):
    _write_root(tmp_path)
    ds = SegmentationDataset(tmp_path, "train", train=True)
    torch.manual_seed(0)
    assert {ds[0]["prompt"] for _ in range(60)} == set(PROMPTS)


def test_resize_and_spacing_from_smaller_stored_images(tmp_path):
    _write_root(tmp_path, size=112)
    item = SegmentationDataset(tmp_path, "train", train=False)[0]
    assert item["image"].shape == (3, 224, 224) and item["mask"].shape == (1, 224, 224)
    assert item["spacing"].tolist() == pytest.approx([0.25, 0.4])
    assert torch.equal((item["image"][0] > 0.5).float(), item["mask"][0])


def test_zoom_rescales_spacing(tmp_path):
    _write_root(tmp_path)
    aug = replace(Augment.geometric_only(), hflip=0.0, vflip=0.0, rotate_deg=0.0, scale=(1.25, 1.25), translate=0.0)
    item = SegmentationDataset(tmp_path, "train", train=True, augment=aug)[0]
    assert item["spacing"].tolist() == pytest.approx([0.4, 0.64])
    assert item["mask"].sum() == pytest.approx(1.25**2 * _mask(224, 0).sum(), rel=0.1)


def test_filters_and_dataloader_collate(tmp_path):
    _write_root(tmp_path)
    with pytest.raises(ValueError, match="no records"):
        SegmentationDataset(tmp_path, "test", train=False)
    only = SegmentationDataset(tmp_path, None, train=False, structures=["nodule"])
    assert len(only) == 4 and {r.structure for r in only.records} == {"nodule"}
    with pytest.raises(ValueError):
        SegmentationDataset(tmp_path, "train", train=False, datasets=["brain"])
    batch = next(iter(DataLoader(SegmentationDataset(tmp_path, "train", train=True), batch_size=4, num_workers=0)))
    assert batch["image"].shape == (4, 3, 224, 224) and batch["mask"].shape == (4, 1, 224, 224)
    assert batch["spacing"].shape == (4, 2) and len(batch["prompt"]) == 4 and isinstance(batch["prompt"][0], str)


def _toy_records(groups: dict[tuple[str, bool], int]) -> list[StructureRecord]:
    records = []
    for (dataset, positive), n in groups.items():
        for i in range(n):
            records.append(
                StructureRecord(
                    f"{dataset}{positive}{i}",
                    "s",
                    dataset,
                    "CT",
                    "x",
                    ["x"],
                    "i.png",
                    "m.png" if positive else None,
                    (1.0, 1.0),
                    (1, 1),
                    "",
                )
            )
    return records


def test_sampling_weights_balance_dataset_and_positive_groups():
    groups = {("brain", True): 90, ("brain", False): 10, ("lung", True): 30, ("lung", False): 170}
    records = _toy_records(groups)
    weights = sampling_weights(records)
    assert weights.shape == (300,) and weights.dtype == torch.float64
    totals = Counter()
    for r, w in zip(records, weights.tolist()):
        totals[(r.dataset, r.positive)] += w
    assert all(t == pytest.approx(75.0) for t in totals.values()), totals
    drawn = list(WeightedRandomSampler(weights, 20000, generator=torch.Generator().manual_seed(0)))
    freq = Counter((records[i].dataset, records[i].positive) for i in drawn)
    assert all(abs(freq[g] / 20000 - 0.25) < 0.02 for g in groups), freq
    by_dataset = sampling_weights(records, by=("dataset",))
    assert by_dataset[:100].sum().item() == pytest.approx(by_dataset[100:].sum().item())
    assert sampling_weights([]).shape == (0,)


def test_unrelated_prompts_replace_the_prompt_and_empty_the_target(tmp_path):
    from freqmedclip.data.dataset import UNRELATED_TRAIN_PROMPTS

    records = _write_root(tmp_path)
    always = SegmentationDataset(tmp_path, "train", train=True, augment=False, unrelated_prompts=1.0)
    torch.manual_seed(0)
    items = [always[i] for i in range(len(always))]
    assert all(item["prompt"] in UNRELATED_TRAIN_PROMPTS and item["structure"] == "unrelated" for item in items)
    assert all(item["mask"].sum() == 0 for item in items) and records[0].mask is not None   # a positive emptied
    never = SegmentationDataset(tmp_path, "train", train=True, augment=False)
    assert never[0]["mask"].sum() > 0 and never[0]["prompt"] in PROMPTS
    with pytest.raises(ValueError, match="training prompts only"):
        SegmentationDataset(tmp_path, "train", train=False, unrelated_prompts=0.1)
    with pytest.raises(ValueError, match="probability"):
        SegmentationDataset(tmp_path, "train", train=True, unrelated_prompts=1.5)


def test_unrelated_phrase_sets_of_training_validation_and_test_are_disjoint_and_name_no_real_structure():
    from freqmedclip.data.dataset import UNRELATED_TRAIN_PROMPTS
    from freqmedclip.data.public.common import PROMPTS as REAL_PROMPTS
    from train.evaluate import HELD_OUT_UNRELATED_PROMPTS
    from train.operating_point import VALIDATION_UNRELATED_PROMPTS

    sets = [set(UNRELATED_TRAIN_PROMPTS), set(VALIDATION_UNRELATED_PROMPTS), set(HELD_OUT_UNRELATED_PROMPTS)]
    assert sum(map(len, sets)) == len(set().union(*sets))      # no phrase in two of them
    from freqmedclip.data.phantoms import brain, breast, lung

    real = {p for prompts in REAL_PROMPTS.values() for p in prompts}
    real |= {p for module in (brain, breast, lung) for prompts in module.STRUCTURES.values() for p in prompts}
    assert real and not set().union(*sets) & real
