"""Folder importer: image types, mask matching/validation, skipped files reported, merging."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from freqmedclip.data.converters.folder import import_folder, main
from freqmedclip.data.format import load_image, load_mask, read_manifest


def _disc(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2


def _csv(path, rows, columns=("image", "structure", "prompt", "subject_id", "mask")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture()
def folder(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    # 16-bit TIFF, 300 wide x 200 high, values far above 255.
    ct = (1000 + 30000 * _disc(200, 300) + rng.integers(0, 500, (200, 300))).astype(np.uint16)
    Image.fromarray(ct).save(images / "a.tif")
    Image.fromarray(_disc(200, 300).astype(np.uint8) * 255).save(masks / "a.png")
    # RGBA PNG with a colour image; mask stored as 0/1.
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(images / "b.png")
    Image.fromarray(_disc(64, 64).astype(np.uint8)).save(masks / "b.png")
    # JPEG image and a lossy JPEG mask (not exactly binary).
    Image.fromarray(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)).save(images / "c.jpg", quality=80)
    Image.fromarray(_disc(100, 120).astype(np.uint8) * 255).save(masks / "c.jpg", quality=60)
    # Corrupt image file.
    (images / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    # Mask size mismatch.
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8)).save(images / "e.png")
    Image.fromarray(_disc(60, 60).astype(np.uint8) * 255).save(masks / "e.png")
    # Non-binary mask values.
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(images / "f.png")
    Image.fromarray((_disc(40, 40) * 200 + (np.arange(40) % 2 == 0)[None] * 50).astype(np.uint8)).save(masks / "f.png")
    rows = [
        {
            "image": "a.tif",
            "structure": "nodule",
            "prompt": "lung nodule|pulmonary nodule",
            "subject_id": "P1",
            "mask": "a.png",
        },
        {"image": "a.tif", "structure": "mass", "prompt": "breast mass", "subject_id": "P1", "mask": ""},
        {"image": "b.png", "structure": "polyp", "prompt": "colon polyp | polyp", "subject_id": "P2", "mask": "b.png"},
        {"image": "c.jpg", "structure": "lesion", "prompt": "skin lesion", "subject_id": "", "mask": "c.jpg"},
        {"image": "d.png", "structure": "lesion", "prompt": "lesion", "subject_id": "P4", "mask": ""},
        {"image": "e.png", "structure": "lesion", "prompt": "lesion", "subject_id": "P5", "mask": "e.png"},
        {"image": "f.png", "structure": "lesion", "prompt": "lesion", "subject_id": "P6", "mask": "f.png"},
    ]
    _csv(tmp_path / "prompts.csv", rows)
    return tmp_path


def test_converts_good_files_and_reports_bad_ones(folder, capsys):
    out = folder / "out"
    main(
        [
            "--images",
            str(folder / "images"),
            "--masks",
            str(folder / "masks"),
            "--prompts",
            str(folder / "prompts.csv"),
            "--out",
            str(out),
            "--modality",
            "CT",
            "--dataset",
            "mine",
            "--spacing",
            "0.5",
        ]
    )
    printed = capsys.readouterr().out
    assert "converted 3 images, 4 records (3 positive, 1 negative)" in printed
    assert "skipped 3 file(s)" in printed
    assert "d.png: unreadable" in printed
    assert "e.png: mask size 60x60 != image size 50x50" in printed
    assert "f.png: non-binary mask values" in printed

    records = {(r.sample_id, r.structure): r for r in read_manifest(out)}
    assert set(records) == {("mine_a", "nodule"), ("mine_a", "mass"), ("mine_b", "polyp"), ("mine_c", "lesion")}
    tiff = records[("mine_a", "nodule")]
    assert tiff.original_size == (200, 300) and tiff.spacing_mm == pytest.approx((0.5 * 200 / 224, 0.5 * 300 / 224))
    assert tiff.prompts == ["lung nodule", "pulmonary nodule"] and tiff.modality == "CT" and tiff.subject_id == "P1"
    stored = np.asarray(Image.open(out / tiff.image))
    assert stored.shape == (224, 224) and stored.dtype == np.uint8 and stored.min() == 0 and stored.max() == 255
    mask = load_mask(out, tiff)
    expected = (
        np.asarray(Image.fromarray(_disc(200, 300).astype(np.uint8) * 255).resize((224, 224), Image.Resampling.NEAREST))
        > 0
    )
    assert np.array_equal(mask, expected)
    bright = load_image(out, tiff)[..., 0]
    assert bright[mask].mean() > 200 and bright[~mask].mean() < 60

    assert records[("mine_a", "mass")].mask is None and not load_mask(out, records[("mine_a", "mass")]).any()
    assert records[("mine_a", "mass")].caption == "CT image with nodule"
    rgba = records[("mine_b", "polyp")]
    assert np.asarray(Image.open(out / rgba.image)).shape == (224, 224, 3)
    assert rgba.prompts == ["colon polyp", "polyp"] and load_mask(out, rgba).sum() > 1000
    jpeg = records[("mine_c", "lesion")]
    assert jpeg.subject_id == "c" and jpeg.source == "c.jpg"
    assert set(np.unique(np.asarray(Image.open(out / jpeg.mask)))) == {0, 255}
    assert {r.split for r in records.values()} <= {"train", "val", "test"}
    assert len({r.split for r in records.values() if r.subject_id == "P1"}) == 1


def test_masks_matched_by_name_without_mask_column(tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("h", "i"):
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)).save(
            images / f"{name}.png"
        )
    Image.fromarray(_disc(32, 32).astype(np.uint8) * 255).save(masks / "h__lesion.png")
    _csv(
        tmp_path / "p.csv",
        [
            {"image": "h.png", "structure": "lesion", "prompt": "lesion"},
            {"image": "i.png", "structure": "lesion", "prompt": "lesion"},
        ],
        ("image", "structure", "prompt"),
    )
    records, skipped = import_folder(images, masks, tmp_path / "p.csv", tmp_path / "out")
    assert skipped == []
    assert {r.sample_id: r.positive for r in records} == {"custom_h": True, "custom_i": False}
    assert "1 row(s) without a mask file" in capsys.readouterr().out


def test_second_import_keeps_other_datasets_and_their_splits(folder):
    out = folder / "out"
    first, _ = import_folder(folder / "images", folder / "masks", folder / "prompts.csv", out, dataset="one")
    second, _ = import_folder(folder / "images", folder / "masks", folder / "prompts.csv", out, dataset="two")
    merged = read_manifest(out)
    assert len(merged) == len(first) + len(second) == 8
    assert [(r.sample_id, r.split) for r in merged if r.dataset == "one"] == [(r.sample_id, r.split) for r in first]


def test_missing_required_column_is_reported(tmp_path):
    _csv(tmp_path / "bad.csv", [{"image": "x.png", "prompt": "p"}], ("image", "prompt"))
    with pytest.raises(SystemExit, match="structure"):
        import_folder(tmp_path, tmp_path, tmp_path / "bad.csv", tmp_path / "out")


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _args(folder, out, *extra):
    paths = ["--images", folder / "images", "--masks", folder / "masks", "--prompts", folder / "prompts.csv"]
    return [str(a) for a in (*paths, "--out", out, "--dataset", "mine", *extra)]


def _tree(out) -> dict[str, bytes]:
    """Every sample file and the manifest, by relative path (markers and the timed summary left out)."""
    files = [p for d in ("images", "masks") for p in sorted((out / d).iterdir())] + [out / "manifest.jsonl"]
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


def test_two_workers_give_the_same_output_as_one(folder):
    one = main(_args(folder, folder / "one", "--workers", "1"))
    two = main(_args(folder, folder / "two", "--workers", "2"))
    assert _tree(folder / "one") == _tree(folder / "two")
    assert {k: v for k, v in one.items() if k not in ("out", "seconds")} == {
        k: v for k, v in two.items() if k not in ("out", "seconds")
    }
    saved = json.loads((folder / "two" / "conversion_mine.json").read_text())
    assert saved["skipped"] == two["skipped"] and len(saved["skipped"]) == 3
    assert saved["records"] == two["records"] and saved["converted"] == 3


def test_rerun_resumes_and_redoes_changed_images(folder, capsys):
    out = folder / "out"
    first = main(_args(folder, out, "--workers", "2"))
    files = _tree(out)
    again = main(_args(folder, out))
    assert (again["converted"], again["resumed"], len(again["skipped"])) == (0, 3, 3)  # bad files retried, reported
    assert "converted 3 images, 4 records (3 positive, 1 negative)" in capsys.readouterr().out
    assert _tree(out) == files and again["records"] == first["records"]

    rows = _rows(folder / "prompts.csv")
    rows[2]["prompt"] = "large colon polyp"  # b.png's only row
    _csv(folder / "prompts.csv", rows)
    edited = main(_args(folder, out))
    assert (edited["converted"], edited["resumed"]) == (1, 2)
    assert {r.sample_id: r.prompts for r in read_manifest(out)}["mine_b"] == ["large colon polyp"]


def test_interrupted_run_resumes_without_half_written_samples(folder, monkeypatch):
    import freqmedclip.data.converters.folder as folder_module

    calls = []
    real_write = folder_module.write_sample

    def write_then_stop(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    out = folder / "out"
    monkeypatch.setattr(folder_module, "write_sample", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(_args(folder, out, "--workers", "1"))
    assert not (out / "manifest.jsonl").exists() and not (out / "images" / f"{calls[1]}.png").exists()
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(folder_module, "write_sample", real_write)
    resumed = main(_args(folder, out, "--workers", "1"))
    assert (resumed["converted"], resumed["resumed"]) == (2, 1)
    main(_args(folder, folder / "clean", "--workers", "1"))
    assert _tree(out) == _tree(folder / "clean")


def test_bad_mask_skips_only_its_row(folder):
    rows = _rows(folder / "prompts.csv")
    rows.append({"image": "b.png", "structure": "tumour", "prompt": "tumour", "subject_id": "P2", "mask": "f.png"})
    _csv(folder / "prompts.csv", rows)
    records, skipped = import_folder(folder / "images", folder / "masks", folder / "prompts.csv", folder / "out")
    assert {(r.sample_id, r.structure) for r in records if r.sample_id == "custom_b"} == {("custom_b", "polyp")}
    assert ("custom_b", f"{folder / 'masks' / 'f.png'}: mask size 40x40 != image size 64x64") in skipped
    again, _ = import_folder(folder / "images", folder / "masks", folder / "prompts.csv", folder / "out")
    assert [(r.sample_id, r.structure) for r in again] == [(r.sample_id, r.structure) for r in records]


def _split_folder(tmp_path, splits: dict[str, str]) -> tuple:
    """Six images of three subjects (S1: a, b; S2: c, d; S3: e, f) and a prompts.csv with a split column."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for name, subject in zip("abcdef", ["S1", "S1", "S2", "S2", "S3", "S3"]):
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(images / f"{name}.png")
        Image.fromarray(_disc(48, 48).astype(np.uint8) * 255).save(masks / f"{name}.png")
        rows.append({"image": f"{name}.png", "structure": "lesion", "prompt": "lesion", "subject_id": subject,
                     "mask": f"{name}.png", "split": splits.get(name, "")})
    _csv(tmp_path / "prompts.csv", rows, ("image", "structure", "prompt", "subject_id", "mask", "split"))
    return images, masks, tmp_path / "prompts.csv"


def test_split_column_keeps_the_official_split(tmp_path):
    # With three subjects the 70/20/10 draw puts two in train; the given split puts two in test.
    official = {"a": "test", "b": "test", "c": "val", "d": "val", "e": "test", "f": "test"}
    images, masks, prompts = _split_folder(tmp_path, official)
    records, skipped = import_folder(images, masks, prompts, tmp_path / "out", dataset="mine")
    assert skipped == []
    assert {r.sample_id: r.split for r in records} == {f"mine_{k}": v for k, v in official.items()}
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert splits == {"test": ["S1", "S3"], "val": ["S2"]}
    summary = json.loads((tmp_path / "out" / "conversion_mine.json").read_text())
    assert summary["samples"] == {"test": 4, "val": 2}
    assert "splits taken from the split column of prompts.csv" in summary["notes"]


def test_split_column_with_a_bad_value_stops_with_its_line(tmp_path):
    images, masks, prompts = _split_folder(tmp_path, {"a": "train", "b": "train", "c": "validation", "d": "val",
                                                      "e": "test", "f": ""})
    with pytest.raises(SystemExit) as info:
        import_folder(images, masks, prompts, tmp_path / "out", dataset="mine")
    message = str(info.value)
    assert "split must be one of train, val, test" in message
    assert "line 4: 'validation'" in message and "line 7: ''" in message
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_split_column_must_agree_within_a_subject(tmp_path):
    images, masks, prompts = _split_folder(tmp_path, {"a": "train", "b": "test", "c": "val", "d": "val",
                                                      "e": "test", "f": "test"})
    with pytest.raises(SystemExit, match=r"same split; 1 do not \(S1: test, train\)"):
        import_folder(images, masks, prompts, tmp_path / "out", dataset="mine")
