"""A3 decoding with the exact KV cache vs the base model's own `generate()` (same weights, same run).

    python bench/bench_sampling.py            # hidden 512, 4 layers, 8 heads / 2 KV heads, vocab 8192
    python bench/bench_sampling.py --quick    # a small config, seconds

Rows (time per generated token, batch 1, 16-token prompt, greedy):
  group-wise s = 1, 2, 4     128 new tokens, left to right        / AR generate() of 128 tokens
  dynamic k = 1, 4           256 blanks, confidence               / AR generate() of 256 tokens
  recompute / cached         512 blanks, k per step: full two-stream forward every step / cached
Each ratio is the median over repeats of a pair timed back to back (load from other processes hits
both alike). Prints the table and writes JSON (default bench/results/sampling.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from a3lm import A3ForCausalLM
from a3lm.debug import tiny_base_model
from a3lm.sampling import sample

CONFIG = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
)  # fmt: skip
QUICK_CONFIG = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SIZES = dict(prompt=16, new=128, dynamic=256, recompute=512, recompute_k=16)
QUICK_SIZES = dict(prompt=8, new=16, dynamic=32, recompute=48, recompute_k=8)


def _timer(fn: Callable[[], object], device: str) -> Callable[[], float]:
    def run() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


def paired(baseline: Callable[[], float], candidate: Callable[[], float], repeats: int, warmup: bool = True) -> dict:
    """Median seconds of each, the median of the per-repeat ratios candidate / baseline, and the ratio
    of the fastest runs (the least disturbed by other processes on a shared machine)."""
    if warmup:
        baseline(), candidate()
    pairs = [(baseline(), candidate()) for _ in range(repeats)]
    return {
        "baseline_s": statistics.median(b for b, _ in pairs),
        "a3_s": statistics.median(c for _, c in pairs),
        "ratio": statistics.median(c / b for b, c in pairs),
        "ratio_min": min(c for _, c in pairs) / min(b for b, _ in pairs),
    }


@torch.no_grad()
def suite_rows(
    a3: A3ForCausalLM, base: torch.nn.Module, device: str = "cpu", quick: bool = False, repeats: int = 3
) -> list[dict]:
    """Every row: {row, N (tokens generated), baseline_s, a3_s (per token), ratio, target}."""
    sizes = QUICK_SIZES if quick else SIZES
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, base.config.vocab_size, (1, sizes["prompt"]), generator=g).to(device)
    prompt[:, 0] = 1  # BOS

    def ar(n: int) -> Callable[[], float]:
        run = _timer(lambda: base.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                           min_new_tokens=n, do_sample=False, pad_token_id=0), device)  # fmt: skip
        return lambda: run() / n

    def a3_run(n: int, **kwargs) -> Callable[[], float]:
        run = _timer(lambda: sample(a3, prompt, length=n, temperature=0, stop_at_eos=False, **kwargs), device)
        return lambda: run() / n

    rows = []
    n = sizes["new"]
    for s, target in ((1, 1.25), (2, None), (4, 0.4)):
        r = paired(ar(n), a3_run(n, group_size=s), repeats)
        rows.append({"row": f"group-wise s={s} / AR", "N": n, **r, "target": target})
    n = sizes["dynamic"]
    for k, target in ((1, None), (4, 1.0)):
        r = paired(ar(n), a3_run(n, dynamic=True, per_step=k), repeats, warmup=False)  # warm by now
        rows.append({"row": f"dynamic k={k} / AR", "N": n, **r, "target": target})
    n, k = sizes["recompute"], sizes["recompute_k"]
    r = paired(a3_run(n, dynamic=True, per_step=k), a3_run(n, dynamic=True, per_step=k, use_cache=False),
               max(1, repeats // 2), warmup=False)  # fmt: skip
    # reported as a speed-up: full recompute time / cached time (higher is better)
    rows.append({"row": f"dynamic k={k}: recompute / cached", "N": n, "baseline_s": r["a3_s"], "a3_s": r["baseline_s"],
                 "ratio": r["ratio"], "ratio_min": r["ratio_min"], "target": 4.0, "higher_is_better": True})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--family", default="llama")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="bench/results/sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = QUICK_CONFIG if args.quick else CONFIG
    base = tiny_base_model(args.family, **config).to(device).eval()
    a3 = A3ForCausalLM.from_base(base).eval()
    base.config._attn_implementation = "sdpa"
    rows = suite_rows(a3, base, device=device, quick=args.quick, repeats=args.repeats)

    print(f"device {device} ({args.threads} threads)  hidden {config['hidden_size']} x {config['num_hidden_layers']} layers, vocab {config['vocab_size']}")
    print(f"{'benchmark':<34} {'N':>5} {'base ms/tok':>12} {'A3 ms/tok':>10} {'ratio':>7} {'(fastest)':>9} {'target':>7}")
    for r in rows:
        target = "" if r["target"] is None else (">=" if r.get("higher_is_better") else "<=") + f"{r['target']:g}"
        print(f"{r['row']:<34} {r['N']:>5} {r['baseline_s'] * 1e3:>12.2f} {r['a3_s'] * 1e3:>10.2f} "
              f"{r['ratio']:>6.2f}x {r['ratio_min']:>8.2f}x {target:>7}")  # fmt: skip
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "cpu": platform.processor(), "threads": args.threads, "config": config,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
