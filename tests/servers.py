"""A real ``mlflow models serve`` process for tests, and a client for it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, payload: dict) -> tuple[int, dict]:
    """POST ``payload`` to ``/invocations``; the status and the decoded body, errors included."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        json.dumps(payload).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@contextlib.contextmanager
def mlflow_server(model: str | Path, folder: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """``mlflow models serve -m MODEL`` on a free port until the block ends; yields the port.

    MLflow starts uvicorn by name, so the venv's ``bin`` goes on ``PATH`` (as an activated venv, or
    ``make serve``, has it). The tracking store defaults to one in ``folder``; the log is ``folder/serve.log``.
    """
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    full_env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlruns.db'}",
        "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    cmd = [str(mlflow_bin), "models", "serve", "-m", str(model), "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "-p", str(port), "-w", "1"]
    log_path = folder / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("server did not start:\n" + log_path.read_text()[-3000:])
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
