"""Phantom benchmark: determinism, mask/prompt/caption consistency, negatives, spacing, sizes."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from freqmedclip.data.phantoms import brain as phantom_brain, breast as phantom_breast
from freqmedclip.data.format import load_image, load_mask, read_manifest
from freqmedclip.data.phantoms.generate import DEFAULT_SUBJECTS, DOMAINS, generate, main, write_examples

N_SUBJECTS = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms_seed0")
    generate(out, n_subjects=N_SUBJECTS, seed=0, workers=1)
    return out


@pytest.fixture(scope="module")
def records(root):
    return read_manifest(root)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_across_worker_counts_and_other_seed_differs(root, tmp_path):
    main(["--out", str(tmp_path / "again"), "--n-subjects", str(N_SUBJECTS), "--seed", "0", "--workers", "2"])
    reference, again = _files(root), _files(tmp_path / "again")
    assert reference.keys() == again.keys()
    assert [k for k in reference if reference[k] != again[k]] == []
    generate(tmp_path / "other", n_subjects=1, seed=1)
    other = _files(tmp_path / "other")
    shared_images = [k for k in reference if k.startswith("images/") and k in other]
    assert shared_images and all(reference[k] != other[k] for k in shared_images)


def test_default_size_is_in_the_intended_range():
    assert 600 <= DEFAULT_SUBJECTS * len(DOMAINS) * 4 <= 900


def test_counts_images_and_shapes(root, records):
    samples = {r.sample_id: r for r in records}
    assert len(samples) == N_SUBJECTS * 4 * 3
    for rec in samples.values():
        stored = np.asarray(Image.open(root / rec.image))
        assert stored.dtype == np.uint8
        assert stored.shape == ((224, 224, 3) if rec.dataset == "brain" else (224, 224))
        assert stored.max() > stored.min()
    modality = {"brain": "MRI", "breast": "MG", "lung": "CT"}
    assert all(r.modality == modality[r.dataset] for r in records)


def test_spacing_and_original_size(records):
    expected = {
        "brain": ((240 / 224,) * 2, (240, 240)),
        "breast": ((0.1 * 512 / 224,) * 2, (512, 512)),
        "lung": ((0.7, 0.7), (224, 224)),
    }
    for r in records:
        spacing, size = expected[r.dataset]
        assert r.spacing_mm == pytest.approx(spacing) and r.original_size == size


def test_positive_masks_non_empty_inside_the_object_and_negatives_empty(root, records):
    for r in records:
        mask = load_mask(root, r)
        assert mask.shape == (224, 224)
        if r.mask is None:
            assert not mask.any()
            continue
        assert 30 <= mask.sum() < 0.5 * mask.size, (r.sample_id, r.structure, int(mask.sum()))
        foreground = load_image(root, r).max(axis=-1) > 0
        assert not (mask & ~foreground).any(), f"{r.sample_id}/{r.structure} mask outside the head/body"
        assert not (mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any())


def test_brain_regions_are_nested_and_oedema_is_whole_minus_core(root, records):
    by_sample = defaultdict(dict)
    for r in records:
        if r.dataset == "brain" and r.structure in phantom_brain.STRUCTURES:
            by_sample[r.sample_id][r.structure] = load_mask(root, r)
    assert len(by_sample) == N_SUBJECTS * 4
    for sample_id, m in by_sample.items():
        assert not (m["enhancing_tumour"] & ~m["tumour_core"]).any(), sample_id
        assert not (m["tumour_core"] & ~m["whole_tumour"]).any(), sample_id
        assert np.array_equal(m["oedema"], m["whole_tumour"] & ~m["tumour_core"]), sample_id
    assert sum(m["enhancing_tumour"].any() for m in by_sample.values()) >= 2


def test_negatives_in_domain_and_cross_domain(records):
    own = {m.DATASET: set(m.STRUCTURES) for m in DOMAINS}
    per_sample = defaultdict(list)
    for r in records:
        per_sample[r.sample_id].append(r)
    for sample_id, rs in per_sample.items():
        dataset = rs[0].dataset
        structures = {r.structure for r in rs}
        assert own[dataset] <= structures
        foreign = [r for r in rs if r.structure not in own[dataset]]
        assert len(foreign) == len(DOMAINS) - 1 and all(r.mask is None for r in foreign), sample_id
    for m in DOMAINS:
        target = next(iter(m.STRUCTURES))
        by_subject = defaultdict(set)
        for r in records:
            if r.dataset == m.DATASET and r.structure == target:
                by_subject[r.subject_id].add(r.positive)
        assert any(v == {True, False} for v in by_subject.values()), (
            f"{m.DATASET}: no subject with both positive and negative images"
        )


def test_prompts_several_phrasings_with_generic_first(records):
    generic = {s: p for m in DOMAINS for s, p in m.STRUCTURES.items()}
    for r in records:
        assert len(r.prompts) >= 3 and r.prompts[: len(generic[r.structure])] == generic[r.structure]
        if r.mask is None:
            assert r.prompts == generic[r.structure]


def test_captions_mention_present_structures(records):
    for r in records:
        if r.dataset == "brain" and r.structure == "enhancing_tumour":
            assert ("enhancing tumour" in r.caption) == r.positive, r.caption
        if r.dataset == "brain" and r.structure == "oedema":
            assert ("oedema" in r.caption) == r.positive, r.caption
        if r.dataset == "brain" and r.structure == "whole_tumour":
            assert r.caption.endswith("without tumour") != r.positive, r.caption
        if r.dataset == "breast" and r.structure == "mass":
            assert ("with a" in r.caption and "mass" in r.caption) == r.positive, r.caption
        if r.dataset == "lung" and r.structure == "nodule":
            assert (
                r.caption == "lung CT without nodule" if not r.positive else "nodule" in r.caption and "mm" in r.caption
            )


def test_subjects_never_cross_splits(records):
    split_of = defaultdict(set)
    for r in records:
        split_of[r.subject_id].add(r.split)
    assert all(len(v) == 1 and v <= {"train", "val", "test"} for v in split_of.values())
    assert len(split_of) == N_SUBJECTS * 3


def test_small_nodules_present_and_all_mass_shapes_offered(root, records):
    diameters = [
        2 * np.sqrt(load_mask(root, r).sum() / np.pi) for r in records if r.structure == "nodule" and r.positive
    ]
    assert any(14 <= d <= 26 for d in diameters), sorted(diameters)
    assert max(diameters) > 30
    shapes = {phantom_breast._mass(np.random.default_rng(i))["shape"] for i in range(30)}
    assert shapes == set(phantom_breast.SHAPES) == {"round", "lobulated", "spiculated"}


def test_examples_are_small_and_listed(root, records, tmp_path):
    path = write_examples(root, records, tmp_path / "examples")
    entries = json.loads(path.read_text())
    assert [e["dataset"] for e in entries] == ["brain", "breast", "lung"]
    for e in entries:
        assert set(e) == {"image", "prompt", "dataset", "modality"}
        file = tmp_path / "examples" / e["image"]
        assert file.stat().st_size < 60_000 and Image.open(file).size == (224, 224)
    assert [e["prompt"] for e in entries] == ["whole tumour", "breast mass", "lung nodule"]


def test_rewriting_the_phantom_examples_keeps_the_credited_real_ones(root, records, tmp_path):
    real = {"image": "lgg_tumour.png", "prompt": "brain tumour", "dataset": "lgg", "modality": "MRI",
            "credit": "LGG (Buda et al. 2019), CC BY-NC-SA 4.0"}
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "examples.json").write_text(json.dumps([real, {"image": "old.png", "dataset": "brain"}]))
    entries = json.loads(write_examples(root, records, tmp_path / "examples").read_text())
    assert entries[0] == real and [e["dataset"] for e in entries[1:]] == ["brain", "breast", "lung"]   # old dropped
