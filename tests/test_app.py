"""The launched app, offline on 127.0.0.1, through gradio_client: /segment, bad uploads, 8 concurrent clients,
no arbitrary file readable, and a clear message (not a stack trace) when no checkpoint exists."""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from _demo_support import EXAMPLES, REPO_ROOT, make_checkpoints, phantom_image, write_dicom, write_png_header
from PIL import Image

gr = pytest.importorskip("gradio")   # in requirements.txt; an install of the package alone (no demo) skips the UI
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
from freqmedclip.demo.examples import load_examples  # noqa: E402
from freqmedclip.demo.session import SetupError, load_session, open_model_sets  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory, mini_backbone_dir, mini_backbone):
    """The app on real checkpoint folders (loaded as `python app.py --checkpoint ...` would), served on loopback."""
    root = tmp_path_factory.mktemp("checkpoints")
    directories = make_checkpoints(root, mini_backbone, seeds=(0,))
    session = load_session(directories, backbone=f"local-dir:{mini_backbone_dir}")
    demo = app.build_demo(session)
    demo.queue(default_concurrency_limit=2)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True,
                            allowed_paths=[str(app.EXAMPLES_DIR)])
    yield url, session, directories
    demo.close()


@contextlib.contextmanager
def _client(url: str):
    """A gradio_client that is closed afterwards (its heartbeat thread would outlive the server otherwise)."""
    client = Client(url, verbose=False)
    try:
        yield client
    finally:
        client.close()


def _segment(url: str, path, prompt: str) -> tuple[np.ndarray, np.ndarray, dict]:
    with _client(url) as client:
        mask, overlay, info = client.predict(handle_file(str(path)), prompt, api_name="/segment")
    return np.asarray(Image.open(mask)), np.asarray(Image.open(overlay).convert("RGB")), info


def test_segment_endpoint_returns_mask_and_overlay(served):
    url, session, _ = served
    mask, overlay, info = _segment(url, EXAMPLES / "lung_nodule.png", "lung nodule")
    expected_mask, expected_overlay, expected_info = session.segment(EXAMPLES / "lung_nodule.png", "lung nodule")
    assert mask.shape == (224, 224) and overlay.shape == (224, 224, 3)
    assert np.array_equal(mask, expected_mask) and np.array_equal(overlay, expected_overlay)   # PNG: lossless
    assert info == json.loads(json.dumps(expected_info)) and info["found"] == bool(mask.any())
    with _client(url) as client:
        endpoints = client.view_api(return_format="dict")["named_endpoints"]
    assert list(endpoints) == ["/segment"]                                 # UI-internal events stay private


def test_bad_uploads_give_readable_errors_and_the_server_keeps_serving(served, tmp_path):
    url, _, _ = served
    (tmp_path / "notes.png").write_text("not an image at all\n")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    cases = {
        tmp_path / "notes.png": "not an image",
        tmp_path / "empty.dcm": "empty",
        tmp_path / "corrupt.dcm": "corrupt DICOM",
        write_png_header(tmp_path / "huge.png", 50_000, 50_000): "too large",
    }
    for path, message in cases.items():
        with pytest.raises(Exception, match=message):
            _segment(url, path, "lung nodule")
    with pytest.raises(Exception, match="prompt is empty"):
        _segment(url, EXAMPLES / "lung_nodule.png", "  ")
    mask, _, _ = _segment(url, write_dicom(tmp_path / "ok.dcm", phantom_image(64).astype(np.uint16) * 4), "nodule")
    assert mask.shape == (64, 64)                                          # still serving, DICOM through the API


def test_eight_concurrent_clients_get_the_sequential_results(served):
    url, _, _ = served
    jobs = [(EXAMPLES / name, prompt) for name in ("brain_whole_tumour.png", "breast_mass.png", "lung_nodule.png")
            for prompt in ("lesion", "normal tissue", "tumour")][:8]
    sequential = [_segment(url, path, prompt) for path, prompt in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda job: _segment(url, *job), jobs))
    for (path, prompt), expected, got in zip(jobs, sequential, parallel):
        assert np.array_equal(expected[0], got[0]), (path.name, prompt)
        assert np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    assert len({m.tobytes() for m, _, _ in sequential}) > 1                # the jobs really differ


def test_no_arbitrary_file_is_readable(served):
    url, _, directories = served
    base = url.rstrip("/")
    secrets = ["/etc/passwd", str(REPO_ROOT / "app.py"), str(directories[0] / "config.json"), "app.py",
               "../../../../../etc/passwd"]
    for secret in secrets:
        for route in ("/gradio_api/file=", "/gradio_api/file/", "/file="):
            response = httpx.get(base + route + secret)
            assert response.status_code in (403, 404), (route, secret, response.status_code)
            assert "root:" not in response.text and "safetensors" not in response.text
    example = httpx.get(base + "/gradio_api/file=" + str(EXAMPLES / "lung_nodule.png"))
    assert example.status_code == 200                                      # the examples folder is served


def test_python_app_without_checkpoints_exits_with_instructions(tmp_path, monkeypatch, capsys):
    import freqmedclip.demo.session

    monkeypatch.setattr(freqmedclip.demo.session, "MODEL_SETS", {"real": tmp_path / "public" / "checkpoints",
                                                                  "phantom": tmp_path / "phantom" / "checkpoints"})
    with pytest.raises(SystemExit) as exit_info:
        app.main([])
    message = str(exit_info.value.code)
    assert "No FreqMedCLIP checkpoint found in" in message and "--checkpoint DIR" in message
    assert str(tmp_path / "public" / "checkpoints") in message and str(tmp_path / "phantom" / "checkpoints") in message
    assert "train.train" in message and "Traceback" not in message
    with pytest.raises(SystemExit, match="no config.json"):
        app.main(["--checkpoint", str(tmp_path)])
    monkeypatch.setenv("FREQMEDCLIP_CHECKPOINT", f"{tmp_path} {tmp_path / 'other'}")       # a Space's variable
    assert app.parse_args([]).checkpoint == [str(tmp_path), str(tmp_path / "other")]


def test_checkpoints_from_the_hub_cache(served, tmp_path, monkeypatch, mini_backbone_dir):
    """``--checkpoint hf-hub:OWNER/REPO/SUBFOLDER`` (how a Space points at trained checkpoints), offline."""
    import shutil

    import huggingface_hub.constants as hf_constants

    _, _, directories = served
    repo = tmp_path / "hub" / "models--someone--freqmedclip-mini"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("1" * 40)
    shutil.copytree(directories[0], repo / "snapshots" / ("1" * 40) / "seed0")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    session = load_session(["hf-hub:someone/freqmedclip-mini/seed0"], backbone=f"local-dir:{mini_backbone_dir}")
    assert session.n_members == 1
    with pytest.raises(SetupError, match="could not fetch"):
        load_session(["hf-hub:someone/not-there/seed0"])


def _component(demo, elem_id: str) -> dict:
    return next(c["props"] for c in demo.config["components"] if c["props"].get("elem_id") == elem_id)


def test_page_offers_the_model_sets_and_switches_them(tmp_path, mini_backbone):
    """The Models selector lists every set, opens on the first holding checkpoints, and its handler swaps the header
    (a failed set keeps the old one serving, with the reason); the gallery credits the real examples."""
    sets = {"Real": tmp_path / "public" / "checkpoints", "Phantoms": tmp_path / "phantom" / "checkpoints",
            "Missing": tmp_path / "missing" / "checkpoints"}
    make_checkpoints(sets["Phantoms"], mini_backbone, seeds=(0,))
    models = open_model_sets(sets=sets)
    demo = app.build_demo(models)
    selector = _component(demo, "models")
    assert [choice[0] for choice in selector["choices"]] == ["Real", "Phantoms", "Missing"]
    assert selector["value"] == "Phantoms"                             # no real checkpoints in this clone
    credits = _component(demo, "example-credits")["value"]
    assert "CC BY-NC-SA 4.0" in credits and "CC BY 3.0" in credits and "BUS-BRA licence" in credits
    captions = [item["caption"] for item in _component(demo, "examples")["value"]]
    assert captions == ["real brain MRI (lgg): brain tumour", "real breast ultrasound (busbra): breast lesion",
                        "real lung CT (lidc): lung nodule", "phantom brain: whole tumour",
                        "phantom breast: breast mass", "phantom lung: lung nodule"]
    switch = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "switch_models")
    failed = switch("Missing", "Phantoms")
    assert failed[0] == "Phantoms" and "Could not load Missing" in failed[3]
    assert failed[1]["value"] == "Phantoms"                            # the selector goes back
    make_checkpoints(sets["Real"], mini_backbone, seeds=(1,))
    (sets["Real"] / "operating_point.json").write_text('{"threshold": 0.7, "split": "val", '
                                                        '"domain_thresholds": {"lgg": 0.85}}')
    assert _component(demo, "per-domain-threshold")["visible"] is False   # the phantom set has none
    done = switch("Real", "Phantoms")
    assert done[0] == "Real" and "Now serving **Real**" in done[3] and done[2] == models.get("Real").header()
    assert done[4]["value"] == 0.7 and "Default mask threshold **0.7**" in done[2]   # the set's own threshold
    assert "brain MRI **0.85**" in done[2]
    assert done[-1]["value"] is True and done[-1]["visible"] is True   # per-domain thresholds offered, ticked
    assert done[6] == "" and done[5] is None                           # verdict and fused mask cleared
    back = switch("Phantoms", "Real")
    assert back[-1]["value"] is False and back[-1]["visible"] is False
    shown = [item["image"]["orig_name"] for item in _component(demo, "examples")["value"]]
    assert shown == [e.path.rsplit("/", 1)[1] for e in load_examples(app.EXAMPLES_DIR)]   # examples.json's order
