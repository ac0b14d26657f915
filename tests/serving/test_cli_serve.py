"""`a3lm serve` as a process: it serves, finishes an in-flight request on SIGTERM and exits with status 0."""

import json
import os
import signal
import socket
import subprocess
import sys
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
        "--graceful",
        "60",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        wait_ready(url, proc)
        body = json.dumps(
            {"model": "tiny", "prompt": "the cat", "max_tokens": 40, "ignore_eos": True, "stream": True}
        ).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            data = sock.recv(4096)
            while b'"event": "fill"' not in data:  # decoding has begun: the request is in flight
                data += sock.recv(4096)
            proc.send_signal(signal.SIGTERM)
            while chunk := sock.recv(65536):
                data += chunk
        assert proc.wait(30) == 0, proc.stderr.read()
        assert b"data: [DONE]" in data  # the in-flight request was finished, not cut
        end = next(json.loads(line[6:]) for line in data.decode().splitlines() if '"event": "end"' in line)
        assert len(end["choices"][0]["a3"]["token_ids"]) == 40
    finally:
        if proc.poll() is None:
            proc.kill()
