"""`a3lm serve` as a process: it serves, finishes an in-flight request on SIGTERM and exits with status 0."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("a3lm serve did not start")


def test_serve_exits_cleanly_on_sigterm(model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "a3lm.cli",
        "serve",
        "--model",
        model_dir,
        "--port",
        str(port),
        "--name",
        "tiny",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        wait_ready(url, proc)
        body = json.dumps(
            {"model": "tiny", "prompt": "the cat", "max_tokens": 60, "ignore_eos": True}
        ).encode()
        reply: dict = {}

        def ask() -> None:
            req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                reply.update(json.loads(r.read()))

        thread = threading.Thread(target=ask)
        thread.start()
        time.sleep(0.3)  # the request is in flight
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()
        thread.join(30)
        assert len(reply["choices"][0]["a3"]["token_ids"]) == 60  # finished, not cut
    finally:
        if proc.poll() is None:
            proc.kill()
