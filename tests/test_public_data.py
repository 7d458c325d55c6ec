"""Public data (python -m freqmedclip.data.public): lock, fetch, per-source conversion, bad input, resume.

A tiny mirror is written at test time in the sources' exact layouts (RGB TIFF slices with FLAIR in the middle
channel, 1-bit PNG masks, four reader masks per crop) with a matching lock; results are checked voxel-exact
against hand-computed ground truth. Where the real mirror exists next to the repository (here and in CI), the
whole of it is converted too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freqmedclip.data.converters.runner import resize_bilinear, resize_nearest, to_uint8
from freqmedclip.data.format import SPLITS, load_mask, read_manifest
from freqmedclip.data.public import brain as public_brain, fetch, lung as public_lung
from freqmedclip.data.public.convert import main
from freqmedclip.data.public.fetch import LockedFile, read_lock, write_lock
from freqmedclip.inference.preprocess import MODALITIES, normalize

REPOS = {
    "brain": "TruongVanHien194276/Brain_Segmentation_data",
    "breast": "solutionbeyondnumbers/Ultra-net-codes-",
    "lung": "periclesanfe/Pulmoseg",
}
COMMIT = "1" * 40
REAL_MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "public-data"
LUNG = "LIDC-IDRI-slices"


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def _square(r0: int, r1: int, c0: int, c1: int, size: int = 128) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def _save(path: Path, array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path, format=fmt)


def _relock(mirror: Path, lock: Path) -> list[LockedFile]:
    """Lock every file of the mirror as it is now."""
    entries = []
    for domain, repo in REPOS.items():
        base = mirror / repo.replace("/", "+")
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            data = path.read_bytes()
            rel = path.relative_to(base).as_posix()
            entries.append(LockedFile(repo, COMMIT, rel, len(data), hashlib.sha256(data).hexdigest(), domain))
    write_lock(entries, lock)
    return entries


class Tiny:
    """Paths and ground truth of the tiny mirror."""

    def __init__(self, root: Path):
        self.mirror, self.lock = root / "mirror", root / "lock.tsv"
        rng = np.random.default_rng(0)
        base = self.mirror / REPOS["brain"].replace("/", "+") / "kaggle_3m"
        self.brain: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        brain_disc = _disc(224, 224, 112, 112, 90)
        for folder, k, tumour, replaced in [
            ("TCGA_AA_0001_20000101", 1, True, False),
            ("TCGA_AA_0001_20000101", 2, False, False),
            ("TCGA_BB_0002_20000202", 3, True, True),
            ("TCGA_CC_0003_20010101", 5, True, False),
        ]:
            rgb = np.where(brain_disc[..., None], rng.integers(1, 256, (224, 224, 3)), 0).astype(np.uint8)
            if replaced:  # the source's quirk: a missing post-contrast T1 replaced by FLAIR
                rgb[..., 2] = rgb[..., 1]
            mask = (_disc(224, 224, 100, 120, 25) if tumour else np.zeros((224, 224), bool)).astype(np.uint8) * 255
            _save(base / folder / f"{folder}_{k}.tif", rgb, fmt="TIFF")
            _save(base / folder / f"{folder}_{k}_mask.tif", mask, fmt="TIFF")
            self.brain[f"lgg_{folder}_{k}"] = (rgb, mask > 0)
        (base / "data.csv").write_text(
            "Patient,neoplasm_histologic_grade,gender\nTCGA_AA_0001,1,2\nTCGA_BB_0002,2,1\nTCGA_CC_0003,2,1\n"
        )

        base = self.mirror / REPOS["breast"].replace("/", "+") / "BUSBRA"
        self.breast: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for image_id, (h, w) in {"0001-l": (224, 224), "0001-r": (300, 150), "0002-s": (180, 240)}.items():
            gray = rng.integers(20, 180, (h, w)).astype(np.uint8)
            gray[:3, :12] = 255  # burned-in scanner text: must not set the maximum
            lesion = _disc(h, w, h / 2, w / 2, min(h, w) / 5)
            gray[lesion] //= 3
            _save(base / "Images" / f"bus_{image_id}.png", gray)
            _save(base / "Masks" / f"mask_{image_id}.png", lesion.astype(np.uint8) * 255, mode="1")
            self.breast[f"bus_{image_id}"] = (gray, lesion)
        (base / "bus_data.csv").write_text(
            "ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX\n"
            'bus_0001-l,1,invasive ductal carcinoma,malignant,4,GE Logiq 7 @10-14MHz,224,224,left,"[1,2,3,4]"\n'
            'bus_0001-r,1,invasive ductal carcinoma,malignant,4,GE Logiq 7 @10-14MHz,150,300,right,"[1,2,3,4]"\n'
            'bus_0002-s,2,fibroadenoma,benign,3,Toshiba Aplio 300,240,180,left,"[1,2,3,4]"\n'
        )
        (base / "LICENSE.txt").write_text("Copyright (c) 2023\nBUS-BRA licence text\n")

        base = self.mirror / REPOS["lung"].replace("/", "+")
        (base).mkdir(parents=True)
        (base / "README.md").write_text("Pulmoseg\n")
        (base / "LICENSE").write_text("MIT\n")
        r0, r1, r2 = _square(50, 70, 50, 70), _square(55, 75, 55, 75), _square(60, 80, 45, 65)
        none = np.zeros((128, 128), dtype=bool)
        disc = _disc(128, 128, 64, 64, 9)
        crops = {
            ("LIDC-IDRI-0001", "nodule-0", 0): [r0, r1, r2, none],  # disagreement, 3 readers
            ("LIDC-IDRI-0001", "nodule-0", 1): [r0, none, none, none],  # one reader: no consensus
            ("LIDC-IDRI-0002", "nodule-3", 4): [disc, disc, disc, disc],
            ("LIDC-IDRI-0003", "nodule-1", 2): [_square(0, 5, 0, 5), _square(90, 99, 90, 99), none, none],
        }
        self.lung: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
        for (patient, nodule, k), readers in crops.items():
            crop = rng.integers(0, 256, (128, 128)).astype(np.uint8)
            crop[0, 0], crop[0, 1] = 0, 255  # the source's per-crop min-max
            folder = base / LUNG / patient / nodule
            _save(folder / "images" / f"slice-{k}.png", crop)
            for r, m in enumerate(readers):
                _save(folder / f"mask-{r}" / f"slice-{k}.png", m.astype(np.uint8) * 255)
            self.lung[f"lidc_{patient}_{nodule}_slice-{k}"] = (crop, readers)
        self.entries = _relock(self.mirror, self.lock)

    def args(self, out: Path, *extra: str) -> list[str]:
        return ["--out", str(out), "--mirror", str(self.mirror), "--lock", str(self.lock), "--workers", "1", *extra]

    def path(self, domain: str, rel: str) -> Path:
        return self.mirror / REPOS[domain].replace("/", "+") / rel


@pytest.fixture()
def tiny(tmp_path) -> Tiny:
    return Tiny(tmp_path)


def _by_sample(out: Path) -> dict[str, dict[str, object]]:
    samples: dict[str, dict[str, object]] = {}
    for r in read_manifest(out):
        samples.setdefault(r.sample_id, {})[r.structure] = r
    return samples


def _stored(out: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(out / rel))


def _no_subject_in_two_splits(out: Path) -> None:
    split_of: dict[tuple[str, str], set[str]] = {}
    for r in read_manifest(out):
        split_of.setdefault((r.dataset, r.subject_id), set()).add(r.split)
    assert all(len(s) == 1 and s <= set(SPLITS) for s in split_of.values()), split_of


def test_tiny_mirror_converts_exactly(tiny, tmp_path):
    out = tmp_path / "out"
    assert main(tiny.args(out)) == 0
    samples = _by_sample(out)
    assert len(samples) == 4 + 3 + 2  # brain slices, breast images, lung crops with a consensus
    for records in samples.values():  # own structure + the other domains' as absent targets
        assert set(records) == {"tumour", "lesion", "nodule"}
        own = {"lgg": "tumour", "busbra": "lesion", "lidc": "nodule"}[next(iter(records.values())).dataset]
        assert all(r.mask is None for s, r in records.items() if s != own)
        assert all(len(r.prompts) >= 5 and r.metadata["spacing_assumed"] for r in records.values())

    # brain: channels (FLAIR, T1 post, T1 pre), each z-scored in the brain, clipped to +-3, background 0
    for sample_id, (rgb, tumour) in tiny.brain.items():
        rec = samples[sample_id]["tumour"]
        stored = _stored(out, rec.image)
        for stored_channel, source_channel in enumerate((1, 2, 0)):
            x = rgb[..., source_channel].astype(np.float64)
            inside = x != 0
            z = (x - x[inside].mean()) / x[inside].std()
            expected = np.where(inside, np.rint((np.clip(z, -3, 3) + 3) * 255 / 6), 0)
            assert np.abs(stored[..., stored_channel].astype(int) - expected).max() <= 1
        assert np.array_equal(load_mask(out, rec), tumour)
        assert (rec.mask is None) == (not tumour.any())
        assert rec.modality == "MRI" and rec.spacing_mm == pytest.approx((0.94, 0.94))
        assert rec.subject_id == sample_id.split("_", 1)[1].rsplit("_", 2)[0]
    free = samples["lgg_TCGA_AA_0001_20000101_2"]["tumour"]
    assert free.caption.endswith("no tumour in this slice") and free.metadata["tumour_present"] is False
    assert samples["lgg_TCGA_BB_0002_20000202_3"]["tumour"].metadata["replaced_by_flair"] == ["post-contrast T1"]
    assert samples["lgg_TCGA_AA_0001_20000101_1"]["tumour"].metadata["tcga_clinical_codes"] == {
        "neoplasm_histologic_grade": "1",
        "gender": "2",
    }

    # breast: US = 0.5-99.5 percentile clip then min-max, as the predictor's "US"; 1-bit masks; metadata
    gray, lesion = tiny.breast["bus_0001-l"]
    rec = samples["bus_0001-l"]["lesion"]
    expected = to_uint8(normalize(gray[..., None], "US")[..., 0].astype(np.float32) * 255.0)
    assert np.abs(_stored(out, rec.image).astype(int) - expected).max() <= 1
    assert np.array_equal(load_mask(out, rec), lesion)
    assert rec.modality == "US" and rec.subject_id == "busbra_0001"
    assert rec.caption == "breast ultrasound: malignant lesion, BI-RADS 4, invasive ductal carcinoma"
    assert {k: rec.metadata[k] for k in ("pathology", "birads", "histology", "device", "malignant")} == {
        "pathology": "malignant",
        "birads": "4",
        "histology": "invasive ductal carcinoma",
        "device": "GE Logiq 7 @10-14MHz",
        "malignant": True,
    }
    tall = samples["bus_0001-r"]["lesion"]
    assert tall.original_size == (300, 150) and tall.spacing_mm == pytest.approx((0.1 * 300 / 224, 0.1 * 150 / 224))
    assert np.array_equal(load_mask(out, tall), resize_nearest(tiny.breast["bus_0001-r"][1], 224))
    assert tall.split == rec.split  # one patient, one split
    assert samples["bus_0002-s"]["lesion"].metadata["malignant"] is False

    # lung: consensus = pixels marked by at least 2 of the 4 readers, computed here pairwise
    crop, (a, b, c, d) = tiny.lung["lidc_LIDC-IDRI-0001_nodule-0_slice-0"]
    truth = (a & b) | (a & c) | (a & d) | (b & c) | (b & d) | (c & d)
    assert truth.sum() == 15 * 15 + 5 * 10 + 10 * 5  # r0&r1 square plus the two strips r2 adds
    rec = samples["lidc_LIDC-IDRI-0001_nodule-0_slice-0"]["nodule"]
    assert np.array_equal(load_mask(out, rec), resize_nearest(truth, 224))
    assert rec.metadata["readers"] == 3 and rec.metadata["consensus_area_px"] == int(truth.sum())
    assert rec.metadata["consensus_area_mm2"] == pytest.approx(truth.sum() * 0.7**2)
    assert rec.metadata["reader_area_px"] == [400, 400, 400, 0]
    assert rec.spacing_mm == pytest.approx((0.7 * 128 / 224, 0.7 * 128 / 224)) and rec.original_size == (128, 128)
    assert np.array_equal(_stored(out, rec.image), to_uint8(resize_bilinear(crop.astype(np.float32), 224)))
    assert samples["lidc_LIDC-IDRI-0002_nodule-3_slice-4"]["nodule"].metadata["readers"] == 4

    report = json.loads((out / "conversion_public.json").read_text())
    assert report["exit_status"] == 0
    assert report["sources"]["lung"]["left_out"] == 2 and report["sources"]["lung"]["skipped"] == 0
    lidc = json.loads((out / "conversion_lidc.json").read_text())
    assert any(n.startswith(public_lung.NO_CONSENSUS) and "[1 case(s)" in n for n in lidc["notes"])
    assert any(n.startswith(public_lung.NO_OVERLAP) and "[1 case(s)" in n for n in lidc["notes"])
    assert "CC BY-NC-SA 4.0" in (out / "LICENSES.md").read_text()
    licence = tiny.path("breast", "BUSBRA/LICENSE.txt").read_bytes()
    assert (out / "licenses" / "BUSBRA_LICENSE.txt").read_bytes() == licence
    _no_subject_in_two_splits(out)


def test_bad_files_are_skipped_by_name_and_fail_the_exit_status(tiny, tmp_path, capsys):
    changed = tiny.path("breast", "BUSBRA/Images/bus_0002-s.png")
    data = bytearray(changed.read_bytes())
    data[-20] ^= 0xFF
    changed.write_bytes(bytes(data))  # same size, other bytes: checksum mismatch
    short = tiny.path("brain", "kaggle_3m/TCGA_CC_0003_20010101/TCGA_CC_0003_20010101_5.tif")
    short.write_bytes(short.read_bytes()[:1000])  # truncated after locking
    missing = tiny.path("lung", f"{LUNG}/LIDC-IDRI-0001/nodule-0/mask-2/slice-0.png")
    missing.unlink()
    # locked as they are now: only decoding or the size check can catch these two
    undecodable = tiny.path("lung", f"{LUNG}/LIDC-IDRI-0002/nodule-3/images/slice-4.png")
    undecodable.write_bytes(undecodable.read_bytes()[:200])
    wrong_size = tiny.path("brain", "kaggle_3m/TCGA_BB_0002_20000202/TCGA_BB_0002_20000202_3_mask.tif")
    _save(wrong_size, np.zeros((100, 100), np.uint8), fmt="TIFF")
    entries = {e.key: e for e in read_lock(tiny.lock)}
    for path in (undecodable, wrong_size):
        key = path.relative_to(tiny.mirror).as_posix()
        raw = path.read_bytes()
        pinned = {**entries[key].__dict__, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        entries[key] = LockedFile(**pinned)
    write_lock(list(entries.values()), tiny.lock)

    out = tmp_path / "out"
    assert main(tiny.args(out)) == 1
    printed = capsys.readouterr()
    reasons = {
        s["case"]: s["reason"]
        for name in ("lgg", "busbra", "lidc")
        for s in json.loads((out / f"conversion_{name}.json").read_text())["skipped"]
    }
    assert reasons.keys() == {
        "bus_0002-s",
        "TCGA_CC_0003_20010101_5",
        "TCGA_BB_0002_20000202_3",
        "LIDC-IDRI-0001_nodule-0_slice-0",
        "LIDC-IDRI-0002_nodule-3_slice-4",
    }
    assert str(changed) in reasons["bus_0002-s"] and "sha256" in reasons["bus_0002-s"]
    assert f"{short}: 1000 bytes, the lock pins" in reasons["TCGA_CC_0003_20010101_5"]
    assert f"{wrong_size}: mask size 100x100 != image size 224x224" in reasons["TCGA_BB_0002_20000202_3"]
    assert f"{missing}: missing file" in reasons["LIDC-IDRI-0001_nodule-0_slice-0"]
    assert f"{undecodable}: cannot decode image" in reasons["LIDC-IDRI-0002_nodule-3_slice-4"]
    assert "5 pinned file(s) missing or bad" in printed.err
    samples = _by_sample(out)  # the rest converted
    assert sorted(samples) == ["bus_0001-l", "bus_0001-r", "lgg_TCGA_AA_0001_20000101_1", "lgg_TCGA_AA_0001_20000101_2"]
    assert not list(out.rglob("*.tmp"))


class FakeGitHub:
    """urlopen stand-in serving the mirror's bytes at their raw.githubusercontent.com URLs."""

    def __init__(self, mirror: Path, corrupt: set[str] = frozenset()):
        self.mirror, self.corrupt, self.requests = mirror, set(corrupt), []

    def __call__(self, url: str, timeout: float = 0):
        self.requests.append(url)
        prefix = "https://raw.githubusercontent.com/"
        owner, repo, _commit, path = url[len(prefix):].split("/", 3)
        data = (self.mirror / f"{owner}+{repo}" / path).read_bytes()
        if any(url.endswith(c) for c in self.corrupt):
            data = data[:-1] + bytes([data[-1] ^ 1])
        return io.BytesIO(data)


def test_download_verifies_caches_and_resumes(tiny, tmp_path, monkeypatch):
    bad = "BUSBRA/Masks/mask_0002-s.png"
    server = FakeGitHub(tiny.mirror, corrupt={bad})
    monkeypatch.setattr(urllib.request, "urlopen", server)
    out = tmp_path / "out"
    args = ["--out", str(out), "--lock", str(tiny.lock), "--workers", "1"]
    assert main(args) == 1
    assert len(server.requests) == len(tiny.entries)
    cache = out / ".download"
    report = json.loads((out / "conversion_public.json").read_text())
    assert list(report["download_failures"]) == [f"{REPOS['breast'].replace('/', '+')}/{bad}"]
    assert not (cache / REPOS["breast"].replace("/", "+") / bad).exists()  # a bad download is never kept
    for e in tiny.entries:
        if not e.path.endswith(bad):
            assert (cache / e.key).read_bytes() == (tiny.mirror / e.key).read_bytes()
    assert "bus_0002-s" not in _by_sample(out) and "bus_0001-l" in _by_sample(out)

    server = FakeGitHub(tiny.mirror)
    monkeypatch.setattr(urllib.request, "urlopen", server)
    assert main(args) == 0
    assert [u.rsplit("/", 3)[-2:] for u in server.requests] == [["Masks", "mask_0002-s.png"]]  # only the missing one
    assert json.loads((out / "conversion_busbra.json").read_text())["resumed"] == 2
    assert "bus_0002-s" in _by_sample(out)

    damaged = cache / tiny.entries[0].key
    damaged.write_bytes(damaged.read_bytes()[:-1])  # a cached file that changed is downloaded again
    server = FakeGitHub(tiny.mirror)
    monkeypatch.setattr(urllib.request, "urlopen", server)
    assert main(args) == 0
    assert server.requests == [tiny.entries[0].url]
    assert damaged.read_bytes() == (tiny.mirror / tiny.entries[0].key).read_bytes()


def test_no_network_and_no_mirror_stops_with_one_message(tiny, tmp_path, monkeypatch):
    def offline(url, timeout=0):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["--out", str(out), "--lock", str(tiny.lock)])
    message = str(info.value)
    assert message.startswith("Cannot download the public data: no network (")
    assert "--mirror DIR" in message and "https://raw.githubusercontent.com/<owner>/<repo>/<commit>/<path>" in message
    assert f"https://github.com/{REPOS['lung']}/tree/{COMMIT}" in message
    assert not (out / "manifest.jsonl").exists() and not [p for p in out.rglob("*") if p.is_file()]


def test_no_network_from_the_command_line_prints_no_traceback(tiny, tmp_path):
    # A proxy on a closed local port makes every download fail as on a machine without network.
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy", "http_proxy")}
    env.update(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    repo_root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "freqmedclip.data.public", "--out", str(tmp_path / "out"), "--lock", str(tiny.lock)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and done.stderr.startswith("Cannot download the public data")
    assert "--mirror" in done.stderr


def test_interrupted_run_resumes_to_the_same_output(tiny, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    assert main(tiny.args(clean)) == 0
    calls = []
    original = public_lung.convert_case

    def interrupted(case, out, opt):
        calls.append(case.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(case, out, opt)

    monkeypatch.setattr(public_lung, "convert_case", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(tiny.args(out))
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(public_lung, "convert_case", original)
    assert main(tiny.args(out)) == 0
    lidc = json.loads((out / "conversion_lidc.json").read_text())
    assert (lidc["resumed"], lidc["converted"]) == (2, 2)
    assert json.loads((out / "conversion_lgg.json").read_text())["resumed"] == 4
    assert (out / "manifest.jsonl").read_bytes() == (clean / "manifest.jsonl").read_bytes()
    for rel in sorted(p.relative_to(clean) for d in ("images", "masks") for p in (clean / d).iterdir()):
        assert (out / rel).read_bytes() == (clean / rel).read_bytes(), rel


def test_lock_file_regenerates_from_a_manifest_and_pins_the_whole_mirror(tmp_path):
    manifest = tmp_path / "MANIFEST.tsv"
    manifest.write_text(
        "domain\trepo\tcommit\tpath\tbytes\tsha256\n"
        f"lung\t{REPOS['lung']}\t{COMMIT}\tb.png\t3\t{'B' * 64}\n"
        f"brain\t{REPOS['brain']}\t{COMMIT}\ta.tif\t5\t{'a' * 64}\n"
    )
    fetch.main(["--manifest", str(manifest), "--lock", str(tmp_path / "lock.tsv")])
    lines = (tmp_path / "lock.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["repo", "commit", "path", "bytes", "sha256", "domain"]
    assert [line.split("\t")[2] for line in lines[1:]] == ["a.tif", "b.png"]  # sorted by domain
    assert read_lock(tmp_path / "lock.tsv")[1].sha256 == "b" * 64
    url = f"https://raw.githubusercontent.com/{REPOS['brain']}/{COMMIT}/a.tif"
    assert read_lock(tmp_path / "lock.tsv")[0].url == url

    packaged = read_lock()
    assert len(packaged) == 13_576 and len({e.key for e in packaged}) == 13_576
    counts = {d: sum(e.domain == d for e in packaged) for d in REPOS}
    assert counts == {"brain": 2 * 398 + 1, "breast": 2 * 885 + 2, "lung": 5 * 2201 + 2}
    assert all(len(e.sha256) == 64 and e.repo == REPOS[e.domain] for e in packaged)


def test_us_modality_is_offered_and_clips_percentiles():
    assert "US" in MODALITIES
    x = np.arange(1000, dtype=np.float32).reshape(100, 10, 1)  # percentiles 0.5 / 99.5 = 4.995 / 994.005
    y = normalize(x, "US")
    assert y.min() == 0.0 and y.max() == 1.0
    assert np.count_nonzero(y == 0.0) == 5 and np.count_nonzero(y == 1.0) == 5
    assert y[50, 0, 0] == pytest.approx((500 - 4.995) / (994.005 - 4.995), rel=1e-6)
    from freqmedclip.data.public.breast import normalise_us
    from freqmedclip.demo.uploads import DICOM_MODALITIES

    np.testing.assert_allclose(normalise_us(x[..., 0]), y[..., 0], atol=1e-6)
    assert DICOM_MODALITIES["US"] == "US"


def test_brain_normalisation_keeps_background_and_clips():
    channel = np.zeros((24, 24), np.uint8)
    channel[2:22, 2:22] = 100 + np.arange(400).reshape(20, 20) % 7
    channel[10, 10] = 255  # one bright outlier of 400 pixels: z far above 3
    out = public_brain.normalise_mri(channel)
    inside = channel != 0
    z = (channel[inside] - channel[inside].mean()) / channel[inside].std()
    assert z.max() > 3
    np.testing.assert_allclose(out[inside], (np.clip(z, -3, 3) + 3) * 255 / 6, rtol=1e-5)
    assert out[10, 10] == pytest.approx(255.0) and (out[~inside] == 0).all()


@pytest.mark.skipif(
    not REAL_MIRROR.is_dir(), reason=f"no public-data mirror at {REAL_MIRROR} (only on the team machines and CI)"
)
def test_whole_real_mirror_converts(tmp_path):
    out = tmp_path / "public"
    code = main(["--out", str(out), "--mirror", str(REAL_MIRROR), "--workers", "2"])
    assert code == 0
    report = json.loads((out / "conversion_public.json").read_text())["sources"]
    assert sum(report["brain"]["images"].values()) == 398
    assert sum(report["breast"]["images"].values()) == 885
    assert sum(report["lung"]["images"].values()) + report["lung"]["left_out"] == 2201
    assert all(t["skipped"] == 0 for t in report.values())
    records = read_manifest(out)
    tumour = [r for r in records if r.dataset == "lgg" and r.structure == "tumour"]
    assert sum(r.mask is not None for r in tumour) == 318 and sum(r.mask is None for r in tumour) == 80
    assert len({r.subject_id for r in tumour}) == 80
    assert len({r.subject_id for r in records if r.dataset == "busbra"}) == 500
    lung = [r for r in records if r.dataset == "lidc" and r.structure == "nodule"]
    assert all(r.metadata["readers"] >= 2 and r.metadata["consensus_area_px"] > 0 for r in lung)
    assert all(r.metadata["spacing_assumed"] for r in records)
    _no_subject_in_two_splits(out)
