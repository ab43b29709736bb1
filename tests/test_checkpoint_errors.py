"""A missing or unreachable checkpoint ends, for every family's model and processor loading, in one line naming
it, within seconds (no retries, no traceback about tokenizer back-ends)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.models import family_names, get_family

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = [(family, what) for family in family_names() for what in ("model", "processor")]
ABSENT_ID = "finetune-tests/no-such-checkpoint"


def _load(family: str, what: str, path: str, revision: str | None = None):
    loader = get_family(family)
    if what == "model":
        return loader.load_model(path, revision=revision)
    return loader.load_processor(path, revision=revision)


def _one_line(family: str, what: str, path: str, revision: str | None = None) -> str:
    start = time.monotonic()
    with pytest.raises(UserError) as excinfo:
        _load(family, what, path, revision)
    assert time.monotonic() - start < 10, "failing took more than seconds"
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{path}"), message
    return message


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub online, with an empty cache: tests set the endpoint."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return constants


@pytest.fixture
def fake_hub(hub, monkeypatch):
    """A local Hub that knows no repository (and, for any repository, no revision `no-such-revision`)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # the Hub's answers: a 404 with the error code in a header
            code = "RevisionNotFound" if "/revision/no-such-revision" in self.path else "RepoNotFound"
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("family, what", ENTRY_POINTS)
def test_a_missing_folder_is_one_line(family, what, tmp_path):
    for path in (str(tmp_path / "no-such-checkpoint"), "./checkpoints/no-such-checkpoint", "runs/a/final"):
        assert _one_line(family, what, path) == f"{path}: checkpoint not found (no such folder)"


@pytest.mark.parametrize("family, what", ENTRY_POINTS)
def test_neither_a_folder_nor_a_hub_id_is_one_line(family, what):
    for path in ("my org/my model", "org/name..", "org/name:v2"):
        message = _one_line(family, what, path)
        assert message == f"{path}: checkpoint not found: neither a local folder nor a Hugging Face Hub id (org/name)"


@pytest.mark.parametrize("family, what", ENTRY_POINTS)
def test_a_hub_id_while_offline_is_one_line(family, what, hub, monkeypatch):
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    message = _one_line(family, what, ABSENT_ID)
    assert message == (
        f"{ABSENT_ID}: checkpoint not found locally or in the Hugging Face cache, and the Hub is offline "
        "(HF_HUB_OFFLINE=1)"
    )


@pytest.mark.parametrize("family, what", ENTRY_POINTS)
def test_a_hub_id_the_hub_does_not_know_is_one_line(family, what, fake_hub):
    message = _one_line(family, what, ABSENT_ID)
    assert message == (
        f"{ABSENT_ID}: no such model on the Hugging Face Hub "
        "(or it is private/gated: log in with huggingface-cli login)"
    )
    message = _one_line(family, what, ABSENT_ID, revision="no-such-revision")
    assert message == f"{ABSENT_ID}: no revision 'no-such-revision' on the Hugging Face Hub"


def test_an_unreachable_hub_fails_in_seconds_for_every_entry_point(tmp_path):
    """As a user gets it: HF_ENDPOINT pointing nowhere, online mode, an empty cache (a subprocess, because
    huggingface_hub reads the environment when it is imported)."""
    script = f"""
import json, time
from finetune.errors import UserError
from tests.test_checkpoint_errors import ENTRY_POINTS, _load
results = []
for family, what in ENTRY_POINTS:
    start = time.monotonic()
    try:
        _load(family, what, {ABSENT_ID!r})
        results.append([family, what, "loaded", time.monotonic() - start])
    except UserError as err:
        results.append([family, what, str(err), time.monotonic() - start])
print(json.dumps(results))
"""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # the discard port: nothing listens, the connection is refused
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(family, what) for family, what, _, _ in results] == ENTRY_POINTS
    for family, what, message, seconds in results:
        assert seconds < 10, (family, what, seconds)
        assert "\n" not in message
        assert message.startswith(
            f"{ABSENT_ID}: checkpoint not found locally or in the Hugging Face cache, and the Hub is unreachable "
            "(http://127.0.0.1:9: "
        ), (family, what, message)
