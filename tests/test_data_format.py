"""On-disk format: write/read round trip, atomic writes, resumable reruns, subject-level splits."""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from freqmedclip.data import format as fmt
from freqmedclip.data.format import (
    StructureRecord,
    assign_splits,
    load_image,
    load_mask,
    read_manifest,
    sample_exists,
    write_manifest,
    write_sample,
)


def _record(
    sample_id: str, subject_id: str, dataset: str = "brain", structure: str = "whole_tumour", mask: str | None = None
) -> StructureRecord:
    return StructureRecord(
        sample_id=sample_id,
        subject_id=subject_id,
        dataset=dataset,
        modality="MRI",
        structure=structure,
        prompts=["whole tumour", "brain tumour"],
        image=f"images/{sample_id}.png",
        mask=mask,
        spacing_mm=(1.0714, 1.0714),
        original_size=(240, 240),
        source="BraTS20_Training_001/flair.nii.gz",
    )


def _all_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_round_trip_gray_rgb_and_masks(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (224, 224), dtype=np.uint8)
    rgb = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    mask = np.zeros((224, 224), dtype=bool)
    mask[50:80, 60:100] = True
    image_rel, mask_rels = write_sample(tmp_path, "g", gray, {"whole_tumour": mask})
    write_sample(tmp_path, "c", rgb, {"tumour_core": mask.astype(np.uint8)})
    assert image_rel == "images/g.png" and mask_rels == {"whole_tumour": "masks/g__whole_tumour.png"}
    assert set(np.unique(np.asarray(Image.open(tmp_path / mask_rels["whole_tumour"])))) == {0, 255}

    records = [
        _record("g", "s1", mask=mask_rels["whole_tumour"]),
        _record("g", "s1", structure="oedema"),
        _record("c", "s2", structure="tumour_core", mask="masks/c__tumour_core.png"),
    ]
    records[0].caption = "brain MRI with glioma"
    assign_splits(records)
    write_manifest(tmp_path, records)
    back = read_manifest(tmp_path)
    assert back == records
    assert isinstance(back[0].spacing_mm, tuple) and isinstance(back[0].original_size, tuple)

    loaded = load_image(tmp_path, back[0])
    assert loaded.dtype == np.uint8 and loaded.shape == (224, 224, 3)
    assert all(np.array_equal(loaded[..., c], gray) for c in range(3))
    assert np.array_equal(load_image(tmp_path, back[2]), rgb)
    assert load_mask(tmp_path, back[0]).dtype == bool and np.array_equal(load_mask(tmp_path, back[0]), mask)
    negative = load_mask(tmp_path, back[1])
    assert negative.shape == (224, 224) and not negative.any()


def test_write_sample_validates_inputs(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_sample(tmp_path, "a", np.zeros((8, 8), dtype=np.float32), {})
    with pytest.raises(ValueError, match="mask shape"):
        write_sample(tmp_path, "a", np.zeros((8, 8), dtype=np.uint8), {"x": np.zeros((4, 4), bool)})
    with pytest.raises(ValueError, match="filesystem-safe"):
        write_sample(tmp_path, "../a", np.zeros((8, 8), dtype=np.uint8), {})


def test_atomic_write_leaves_no_temp_files_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    image = np.full((16, 16), 7, dtype=np.uint8)
    write_sample(tmp_path, "a", image, {"x": np.eye(16, dtype=bool)})
    write_manifest(tmp_path, [_record("a", "s")])
    assert _all_files(tmp_path) == ["images/a.png", "manifest.jsonl", "masks/a__x.png", "splits.json"]
    before = (tmp_path / "images/a.png").read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_sample(tmp_path, "a", np.zeros((16, 16), np.uint8), {}, overwrite=True)
    assert (tmp_path / "images/a.png").read_bytes() == before
    assert _all_files(tmp_path) == ["images/a.png", "manifest.jsonl", "masks/a__x.png", "splits.json"]


def test_rerun_skips_existing_files_unless_overwrite(tmp_path):
    first, second = np.zeros((16, 16), np.uint8), np.full((16, 16), 200, np.uint8)
    assert not sample_exists(tmp_path, "a", ["x"])
    write_sample(tmp_path, "a", first, {"x": np.eye(16, dtype=bool)})
    assert sample_exists(tmp_path, "a", ["x"]) and not sample_exists(tmp_path, "a", ["y"])
    write_sample(tmp_path, "a", second, {"x": np.zeros((16, 16), bool)})
    assert np.asarray(Image.open(tmp_path / "images/a.png")).max() == 0
    assert np.asarray(Image.open(tmp_path / "masks/a__x.png")).max() == 255
    write_sample(tmp_path, "a", second, {"x": np.zeros((16, 16), bool)}, overwrite=True)
    assert np.asarray(Image.open(tmp_path / "images/a.png")).min() == 200
    assert np.asarray(Image.open(tmp_path / "masks/a__x.png")).max() == 0


def _many_records():
    records = []
    for dataset, n_subjects in (("brain", 120), ("lung", 60), ("breast", 3)):
        for s in range(n_subjects):
            for z in range(3):
                records.append(_record(f"{dataset}_{s}_{z}", f"{dataset}_{s}", dataset=dataset))
    return records


def test_splits_are_subject_level_stratified_and_deterministic(tmp_path):
    records = _many_records()
    assign_splits(records, seed=0)
    split_of = defaultdict(set)
    for r in records:
        split_of[r.subject_id].add(r.split)
    assert all(len(s) == 1 for s in split_of.values()), "a subject appears in two splits"
    for dataset, n in (("brain", 120), ("lung", 60)):
        counts = Counter(next(iter(split_of[f"{dataset}_{s}"])) for s in range(n))
        assert counts == {"train": round(0.7 * n), "val": round(0.2 * n), "test": round(0.1 * n)}, counts
    tiny = Counter(next(iter(split_of[f"breast_{s}"])) for s in range(3))
    assert tiny == {"train": 1, "val": 1, "test": 1}

    shuffled = _many_records()
    random.Random(1).shuffle(shuffled)
    assign_splits(shuffled, seed=0)
    assert {r.sample_id: r.split for r in shuffled} == {r.sample_id: r.split for r in records}
    other = _many_records()
    assign_splits(other, seed=1)
    assert {r.sample_id: r.split for r in other} != {r.sample_id: r.split for r in records}

    write_manifest(tmp_path, records)
    lists = json.loads((tmp_path / "splits.json").read_text())
    assert set(lists) == {"train", "val", "test"}
    assert len(lists["test"]) == 12 + 6 + 1 and not set(lists["train"]) & set(lists["test"])


def test_split_fractions_within_tolerance_for_uneven_sizes():
    records = [_record(f"s{i}", f"s{i}", dataset="custom") for i in range(37)]
    assign_splits(records, fractions=(0.7, 0.2, 0.1), seed=3)
    counts = Counter(r.split for r in records)
    assert (
        abs(counts["train"] / 37 - 0.7) < 0.03
        and abs(counts["val"] / 37 - 0.2) < 0.03
        and abs(counts["test"] / 37 - 0.1) < 0.03
    )
    with pytest.raises(ValueError, match="sum"):
        assign_splits(records, fractions=(0.5, 0.2, 0.1))


def test_stratify_by_callable_keeps_strata_balanced():
    records = [_record(f"s{i}", f"s{i}") for i in range(100)]
    grade = {f"s{i}": "HGG" if i < 80 else "LGG" for i in range(100)}
    assign_splits(records, seed=0, stratify_by=lambda r: grade[r.subject_id])
    lgg = Counter(r.split for r in records if grade[r.subject_id] == "LGG")
    assert lgg == {"train": 14, "val": 4, "test": 2}


def test_files_are_moved_into_place_from_hidden_temp_files(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(fmt.os, "replace", spy)
    write_sample(tmp_path, "a", np.zeros((4, 4), np.uint8), {})
    assert len(seen) == 1 and seen[0].startswith(".a.png.") and seen[0].endswith(".tmp")
