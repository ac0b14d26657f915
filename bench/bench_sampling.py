"""A3 decoding with the exact KV cache vs the base model's own `generate()` (same weights, same run).

    python bench/bench_sampling.py                 # hidden 512, 4 layers, 8 heads / 2 KV heads, vocab 8192
    python bench/bench_sampling.py --quick         # a small config, seconds
    python bench/bench_sampling.py --model DIR     # a saved A3 checkpoint (e.g. SmolLM2), its own weights
    python bench/bench_sampling.py --profile       # torch.profiler's top ops of an s = 1 run, then exit
    python bench/bench_sampling.py --model DIR --only-speculative --k 4   # speculative rows on held-out text
    python bench/bench_sampling.py --only-speculative --schedule heuristic  # the adaptive window (from k)

Rows (time per generated token, batch 1, 16-token prompt):
  group-wise s = 1, 2, 4     128 new tokens, left to right, greedy  / AR generate() of 128 tokens
  dynamic k = 1, 4           256 blanks, confidence, greedy         / AR generate() of 256 tokens
  recompute / cached         512 blanks, k per step: full two-stream forward every step / cached, and
                             the bound on that speed-up from counting multiply-adds (both paths score
                             every unfilled position every step; only the content work differs)
  speculative k              128 new tokens (left to right, random order) or a 128-token middle
                             blank between prompt and a 16-token suffix (infilling), temperature 1:
                             tokens per forward, draft acceptance, time per token / s = 1 of the
                             same order and / generate()
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
from bench_model import CPU_CONFIG, QUICK_CONFIG

from a3lm import A3ForCausalLM
from a3lm.decoding.api import infill, sample
from a3lm.model.debug import tiny_base_model
from a3lm.model.modeling import MIN_SKIPPED_ROWS

SIZES = dict(prompt=16, new=128, dynamic=256, recompute=512, recompute_k=16)
QUICK_SIZES = dict(prompt=8, new=16, dynamic=32, recompute=48, recompute_k=8)


def step_macs(config: dict, content: int, queries: int, keys: int, skip_content: bool = True) -> int:
    """Multiply-adds of one two-stream forward of `content` + `queries` rows over `keys` keys: the
    projections, attention scores and values, MLPs and the lm_head on the query rows (with
    skip_content, the last layer runs only k_proj and v_proj on the content rows). Elementwise work is
    left out."""
    H, L, V = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    n_heads, n_kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
    )
    head_dim, inner = H // n_heads, config.get("intermediate_size", 4 * H)
    kv_proj = 2 * H * n_kv * head_dim
    rest = 2 * H * n_heads * head_dim + 2 * keys * n_heads * head_dim + 3 * H * inner  # q, o, attention, MLP
    rows = content + queries
    last_layer = rows * kv_proj + (queries if skip_content else rows) * rest
    return (L - 1) * rows * (kv_proj + rest) + last_layer + queries * H * V


def dynamic_recompute_bound(config: dict, prompt: int, blanks: int, k: int) -> float:
    """MACs of full recompute / MACs of cached steps, for dynamic decoding of `blanks` positions k per
    step: the speed-up the cache can give where both are compute-bound. Every cached step still scores
    every unfilled position, which bounds it well below blanks / k."""
    N, cached, full = prompt + blanks, 0, 0
    committed, new_content, left = 0, prompt, blanks
    while left > 0:
        keys = committed + new_content + left  # + own query slots
        cached += step_macs(config, new_content, left, keys, skip_content=new_content >= MIN_SKIPPED_ROWS)
        full += step_macs(config, N, N, N)
        committed, new_content = committed + new_content, min(k, left)
        left -= new_content
    return full / cached


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


def generate_timer(base: torch.nn.Module, prompt: torch.Tensor, n: int, device: str) -> Callable[[], float]:
    """Times the baseline: transformers' greedy `generate()` of exactly n tokens after `prompt`."""
    return _timer(
        lambda: base.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        ),
        device,
    )


def paired(
    baseline: Callable[[], float], candidate: Callable[[], float], repeats: int, warmup: bool = True
) -> dict:
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
    a3: A3ForCausalLM,
    base: torch.nn.Module,
    device: str = "cpu",
    quick: bool = False,
    repeats: int = 3,
    sizes: dict | None = None,
    speculative_ks: tuple[int, ...] = (4, 8),
) -> list[dict]:
    """Every row: {row, N (tokens generated), baseline_s, a3_s (per token), ratio, target}."""
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, base.config.vocab_size, (1, sizes["prompt"]), generator=g).to(device)
    prompt[:, 0] = 1  # BOS

    def ar(n: int) -> Callable[[], float]:
        run = generate_timer(base, prompt, n, device)
        return lambda: run() / n

    def a3_run(n: int, **kwargs) -> Callable[[], float]:
        run = _timer(lambda: sample(a3, prompt, length=n, temperature=0, stop_at_eos=False, **kwargs), device)
        return lambda: run() / n

    rows = []
    n = sizes["new"]
    for s, target in ((1, 1.3), (2, None), (4, 0.35)):
        r = paired(ar(n), a3_run(n, group_size=s), repeats)
        rows.append({"row": f"group-wise s={s} / AR", "N": n, **r, "target": target})
    n = sizes["dynamic"]
    for k, target in ((1, None), (4, 1.5)):
        r = paired(ar(n), a3_run(n, dynamic=True, per_step=k), repeats, warmup=False)  # warm by now
        rows.append({"row": f"dynamic k={k} / AR", "N": n, **r, "target": target})
    n, k = sizes["recompute"], sizes["recompute_k"]
    r = paired(
        a3_run(n, dynamic=True, per_step=k),
        a3_run(n, dynamic=True, per_step=k, use_cache=False),
        max(1, repeats // 2),
        warmup=False,
    )
    # reported as a speed-up: full recompute time / cached time (higher is better), with the MAC bound
    bound = dynamic_recompute_bound(base.config.to_dict(), sizes["prompt"], n, k)
    rows.append(
        {
            "row": f"dynamic k={k}: recompute / cached",
            "N": n,
            "baseline_s": r["a3_s"],
            "a3_s": r["baseline_s"],
            "ratio": r["ratio"],
            "ratio_min": r["ratio_min"],
            "target": 4.0,
            "higher_is_better": True,
            "mac_bound": bound,
        }
    )
    return rows + (
        speculative_rows(a3, base, prompt, sizes, device, repeats, speculative_ks) if speculative_ks else []
    )


def base_from_a3(a3: A3ForCausalLM) -> torch.nn.Module:
    """The plain `*ForCausalLM` with the A3 model's own weights (SDPA attention): generate()'s baseline."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(a3.config.text_config)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=a3.dtype)
    missing, _ = base.load_state_dict(
        {k: v for k, v in a3.state_dict().items() if k != "query_embed"}, strict=False
    )
    if set(missing) - {"lm_head.weight"}:
        raise ValueError(f"A3 weights do not fit the base model: missing {missing}")
    base.tie_weights()
    return base.to(a3.device).eval()


@torch.no_grad()
def speculative_rows(
    a3, base, prompt, sizes, device: str, repeats: int, ks=(4, 8), suffix=None, schedule: str = "constant"
) -> list[dict]:
    """Speculative decoding (temperature 1) per order: tokens per forward, acceptance, time ratios.
    suffix [1, S]: the text after the infilling blank (default: any 15 tokens). schedule: the window's
    (constant k, or heuristic from k)."""
    n = sizes["new"]
    suffix = prompt[:, 1:].flip(1) if suffix is None else suffix
    ids = torch.cat([prompt, torch.zeros(1, n, dtype=torch.long, device=device), suffix], dim=1)
    known = torch.ones_like(ids, dtype=torch.bool)
    known[:, prompt.shape[1] : prompt.shape[1] + n] = False

    def run(order: str, **kw):
        if order == "infilling":
            return infill(a3, ids, known, temperature=1.0, seed=0, **kw)
        return sample(a3, prompt, length=n, order=order, temperature=1.0, seed=0, stop_at_eos=False, **kw)

    ar = generate_timer(base, prompt, n, device)
    rows = []
    for order in ("left-to-right", "random", "infilling"):
        s1 = _timer(lambda order=order: run(order), device)
        for k in ks:
            out = run(order, speculative=k, speculative_schedule=schedule)
            spec = _timer(
                lambda order=order, k=k: run(order, speculative=k, speculative_schedule=schedule), device
            )
            vs_s1 = paired(s1, spec, repeats)
            vs_ar = paired(ar, spec, repeats, warmup=False)
            rows.append(
                {
                    "row": f"speculative k={k}{'+' if schedule == 'heuristic' else ''} {order} / s=1",
                    "N": n,
                    "baseline_s": vs_s1["baseline_s"] / n,
                    "a3_s": vs_s1["a3_s"] / n,
                    "ratio": vs_s1["ratio"],
                    "ratio_min": vs_s1["ratio_min"],
                    "target": None,
                    "tokens_per_forward": n / out.num_steps,
                    "acceptance": out.accepted / max(out.drafted, 1),
                    "vs_generate": vs_ar["ratio"],
                    "vs_generate_min": vs_ar["ratio_min"],
                }
            )
    return rows


def text_prompt(model_dir: str, sizes: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt [1, P], suffix [1, P]) from one held-out row of real text: its first P tokens (row start
    included) and the P tokens that follow a blank of `sizes["new"]`."""
    from transformers import AutoTokenizer

    from a3lm.evaluation.nll import heldout_rows

    P, n = sizes["prompt"], sizes["new"]
    row = heldout_rows(AutoTokenizer.from_pretrained(model_dir), "fortunes:heldout", 2 * P + n, 1)
    return row[:, :P].to(device), row[:, P + n :].to(device)


def profile_s1(a3: A3ForCausalLM, device: str, n: int = 64, top: int = 15) -> None:
    """torch.profiler's top ops (self CPU time) of one s = 1 run of n tokens, after a warm-up run."""
    from torch.profiler import ProfilerActivity, profile

    prompt = torch.ones(1, 16, dtype=torch.long, device=device)
    sample(a3, prompt, length=8, temperature=0, stop_at_eos=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        sample(a3, prompt, length=n, temperature=0, stop_at_eos=False)
        seconds = time.perf_counter() - t0
    print(f"s = 1, {n} tokens: {seconds / n * 1e3:.2f} ms per token under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--family", default="llama")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--model",
        default=None,
        help="A saved A3 checkpoint to time (its own weights; generate() on the same).",
    )
    parser.add_argument(
        "--new", type=int, default=None, help="Tokens per row (default 128; 16 with --quick)."
    )
    parser.add_argument(
        "--profile", action="store_true", help="Print torch.profiler's top ops of an s = 1 run and exit."
    )
    parser.add_argument(
        "--only-speculative",
        action="store_true",
        help="Only the speculative rows; with --model, on held-out text (fortunes:heldout): its first "
        "16 tokens as the prompt and, for infilling, the 16 after the blank as the suffix.",
    )
    parser.add_argument(
        "--no-speculative", action="store_true", help="Leave the speculative rows out (timing rows only)."
    )
    parser.add_argument("--k", default="4,8", help="Speculative drafts per forward, comma-separated.")
    parser.add_argument(
        "--schedule", default="constant", help="Speculative window schedule: constant or heuristic (k+)."
    )
    parser.add_argument("--output", default="bench/results/sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        a3 = A3ForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
        base, config = base_from_a3(a3), a3.config.text_config.to_dict()
    else:
        config = QUICK_CONFIG if args.quick else CPU_CONFIG
        base = tiny_base_model(args.family, **config).to(device).eval()
        a3 = A3ForCausalLM.from_base(base).eval()
        base.set_attn_implementation("sdpa")
    if args.profile:
        profile_s1(a3, device)
        return
    sizes = (
        None
        if args.new is None
        else dict(prompt=16, new=args.new, dynamic=2 * args.new, recompute=4 * args.new, recompute_k=16)
    )
    ks = tuple(int(k) for k in args.k.split(","))
    if args.only_speculative:
        sizes = sizes or (QUICK_SIZES if args.quick else SIZES)
        prompt, suffix = text_prompt(args.model, sizes, device) if args.model else (None, None)
        if prompt is None:
            prompt = torch.randint(
                4, base.config.vocab_size, (1, sizes["prompt"]), generator=torch.Generator().manual_seed(0)
            )
            prompt[:, 0] = 1
        rows = speculative_rows(
            a3, base, prompt.to(device), sizes, device, args.repeats, ks, suffix, args.schedule
        )
    else:
        rows = suite_rows(
            a3,
            base,
            device=device,
            quick=args.quick,
            repeats=args.repeats,
            sizes=sizes,
            speculative_ks=() if args.no_speculative else ks,
        )

    what = (
        args.model
        or f"hidden {config['hidden_size']} x {config['num_hidden_layers']} layers, "
        f"vocab {config['vocab_size']}"
    )
    print(
        f"device {device} ({args.threads} threads)  {what}  "
        "(ratios: medians of pairs timed back to back, same run)"
    )
    print(
        f"{'benchmark':<40} {'N':>5} {'base ms/tok':>12} {'A3 ms/tok':>10} {'ratio':>7} "
        f"{'(fastest)':>9} {'target':>7}"
        f" {'tok/fwd':>7} {'accept':>6} {'/generate':>9}"
    )
    for r in rows:
        target = (
            "" if r["target"] is None else (">=" if r.get("higher_is_better") else "<=") + f"{r['target']:g}"
        )
        spec = (
            f" {r['tokens_per_forward']:>7.2f} {r['acceptance']:>6.2f} {r['vs_generate']:>8.2f}x"
            if "acceptance" in r
            else ""
        )
        spec += f"  (MAC bound {r['mac_bound']:.2f}x)" if "mac_bound" in r else ""
        print(
            f"{r['row']:<40} {r['N']:>5} {r['baseline_s'] * 1e3:>12.2f} {r['a3_s'] * 1e3:>10.2f} "
            f"{r['ratio']:>6.2f}x {r['ratio_min']:>8.2f}x {target:>7}{spec}"
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device,
        "cpu": platform.processor(),
        "threads": args.threads,
        "config": config,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
