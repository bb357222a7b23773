"""JupyterLab for real: start the server, run notebooks through its kernel API, top to bottom.

This is what ``make lab`` gives a user: the server's own kernel (the project's .venv)
executes each code cell of a notebook with its defaults, in order, over the kernel
websocket, and no cell may fail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

from pcamlib import config

websocket = pytest.importorskip("websocket", reason="websocket-client comes with jupyterlab")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, "PCAM_REPORTS_ROOT": str(tmp_path_factory.mktemp("lab-reports"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={config.NOTEBOOKS_DIR}", "--ServerApp.open_browser=False",
         *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI runs as root
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"JupyterLab did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(1)
    yield base, token
    proc.terminate()
    proc.wait(timeout=30)


def _api(base: str, token: str, path: str, method: str = "GET", body: dict | None = None):
    req = urllib.request.Request(
        f"{base}{path}", method=method, data=json.dumps(body).encode() if body else None,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def _run_cells(base: str, token: str, kernel_id: str, sources: list[str]) -> list[dict]:
    ws = websocket.create_connection(
        base.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels?token={token}",
        timeout=1800,
    )
    results = []
    try:
        for source in sources:
            msg_id = uuid.uuid4().hex
            ws.send(json.dumps({
                "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                           "session": uuid.uuid4().hex, "version": "5.3"},
                "parent_header": {}, "metadata": {}, "channel": "shell",
                "content": {"code": source, "silent": False, "store_history": True,
                            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
            }))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "execute_reply":
                    results.append(msg["content"])
                    break
    finally:
        ws.close()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_data_exploration", "02_augmentation_preview"])
def test_notebook_runs_top_to_bottom_in_jupyterlab(lab_server, name):
    base, token = lab_server
    specs = _api(base, token, "/api/kernelspecs")
    assert "python3" in specs["kernelspecs"]
    kernel = _api(base, token, "/api/kernels", "POST", {"name": "python3"})
    try:
        nb = nbformat.read(Path(config.NOTEBOOKS_DIR) / f"{name}.ipynb", as_version=4)
        sources = [c.source for c in nb.cells if c.cell_type == "code"]
        replies = _run_cells(base, token, kernel["id"], sources)
        errors = [(i, r.get("ename"), r.get("evalue")) for i, r in enumerate(replies)
                  if r["status"] != "ok"]
        assert not errors, errors
        assert len(replies) == len(sources)
        # The kernel JupyterLab runs is this environment's interpreter (the project's .venv).
        check = _run_cells(base, token, kernel["id"],
                           [f"import sys, pcamlib; assert sys.prefix == {sys.prefix!r}"])
        assert check[0]["status"] == "ok", check
    finally:
        _api(base, token, f"/api/kernels/{kernel['id']}", "DELETE")
