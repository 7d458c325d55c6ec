"""The launched app logs one line, not a traceback, for a user error (issue 16)."""

from __future__ import annotations

import logging

import pytest
from _demo_support import EXAMPLES, decisive_model

gr = pytest.importorskip("gradio")   # in requirements.txt; an install of the package alone (no demo) skips the UI
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
from freqmedclip.demo.session import DemoSession  # noqa: E402
from freqmedclip.inference.predictor import Predictor  # noqa: E402


def test_user_errors_log_one_line_and_no_traceback(mini_backbone, capfd, caplog):
    demo = app.build_demo(DemoSession(Predictor(decisive_model(mini_backbone))))
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        capfd.readouterr()
        client = Client(url, verbose=False)
        with caplog.at_level(logging.WARNING, logger="freqmedclip.demo"):
            with pytest.raises(Exception, match="prompt is empty"):
                client.predict(handle_file(str(EXAMPLES / "lung_nodule.png")), "  ", api_name="/segment")
        client.close()
    finally:
        demo.close()
    output = capfd.readouterr()
    assert "Traceback" not in output.out + output.err
    records = [r for r in caplog.records if r.name == "freqmedclip.demo"]
    assert len(records) == 1 and "prompt is empty" in records[0].getMessage()
