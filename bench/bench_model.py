"""Two-stream training step vs the plain AR step of the same base model (same B, N, same run).

    python bench/bench_model.py              # hidden 512, 4 layers, vocab 8192, B=2, N=256 and 512
    python bench/bench_model.py --quick      # a small config, seconds
    python bench/bench_model.py --profile    # also the top ops of one A3 step (self CPU time, memory)

For the A3 model with the own-slot rule (query_self_attention, the default), without it (XLNet's
rule), and without its MLP recomputation (`A3Config.recompute_mlp`), prints the step time ratio
(A3 fwd+bwd) / (AR fwd+bwd), medians over repeats with the steps run in turns, and the peak tensor
memory growth of one step (A3 / AR), and writes JSON. Two baselines: the plain Hugging Face AR step,
and the AR step with the same MLP recomputation (like for like: the two streams' cost alone).

Peak memory: the profiler's allocation events (bytes allocated and freed, in order) summed over the
step, whose running maximum is the step's peak growth above what was allocated before it. Unlike
the resident set size this works on CPU in one process and counts tensors only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from a3lm import A3Config, A3ForCausalLM, groups
from a3lm.model.debug import tiny_base_model
from a3lm.model.mlp import recompute_gated_mlps

CPU_CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
QUICK_CONFIG = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def interleaved_times(fns: list, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each fn, run in turns so that load from other processes hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def peak_memory_growth(fn: Callable[[], object]) -> int:
    """Peak bytes of live CPU tensors during fn() above those live before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for frees
        peak = max(peak, live)
    return peak


def profile_top(fn: Callable[[], object], rows: int = 12) -> str:
    """Top ops of one fn() call by self CPU time and by self CPU memory."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    table = prof.key_averages()
    return "\n".join(
        table.table(sort_by=key, row_limit=rows, max_name_column_width=48)
        for key in ("self_cpu_time_total", "self_cpu_memory_usage")
    )


def a3_variant(base, query_self_attention: bool, recompute_mlp: bool = True) -> A3ForCausalLM:
    """An A3 model over `base`'s weights with the own-slot rule on or off, MLP recomputation on or off."""
    config = A3Config(
        text_config=base.config.to_dict(),
        query_self_attention=query_self_attention,
        recompute_mlp=recompute_mlp,
    )
    model = A3ForCausalLM(config)
    model.load_state_dict(A3ForCausalLM.from_base(base).state_dict())
    return model.train()


def step_fns(base, models: dict, batch: int, seq_len: int, group_size: int) -> dict:
    """One fwd+bwd step per model, on the same random tokens (A3: random groups of `group_size`)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones_like(ids)
    group_ids = groups.random_order(mask, group_size, g)

    def ar_step():
        base(input_ids=ids, labels=ids).loss.backward()
        base.zero_grad(set_to_none=True)  # inside the step: the peak counts the gradients it allocates

    def ar_recompute_step():  # the AR step with the A3 model's MLP recomputation: the like-for-like baseline
        with recompute_gated_mlps(base.model):
            ar_step()

    def a3_step(model):
        def step():
            model(input_ids=ids, group_ids=group_ids, attention_mask=mask, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    return {"ar": ar_step, "ar (mlp recompute)": ar_recompute_step} | {
        n: a3_step(m) for n, m in models.items()
    }


def measure(base, models: dict, batch: int, seq_len: int, group_size: int, repeats: int) -> dict:
    steps = step_fns(base, models, batch, seq_len, group_size)
    names = list(steps)
    times = dict(zip(names, interleaved_times([steps[n] for n in names], repeats), strict=True))
    memory = {n: statistics.median(peak_memory_growth(steps[n]) for _ in range(3)) for n in names}
    row = {"batch": batch, "seq_len": seq_len, "time_s": times, "peak_bytes": memory}
    rc = "ar (mlp recompute)"
    row["time_ratio"] = {n: times[n] / times["ar"] for n in [rc, *models]}
    row["memory_ratio"] = {n: memory[n] / memory["ar"] for n in [rc, *models]}
    # like for like: both steps recompute the MLP (the A3 default), so the ratio is the two streams'
    # cost alone
    row["time_ratio_vs_ar_recompute"] = {n: times[n] / times[rc] for n in models}
    row["memory_ratio_vs_ar_recompute"] = {n: memory[n] / memory[rc] for n in models}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--family", default="llama")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--profile", action="store_true", help="print the top ops of one A3 step at the largest N"
    )
    parser.add_argument("--output", default="bench/results/model.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    size = QUICK_CONFIG if args.quick else CPU_CONFIG
    base = tiny_base_model(args.family, **size).train()
    base.set_attn_implementation("sdpa")
    models = {
        "a3 (own slot)": a3_variant(base, True),
        "a3 (xlnet)": a3_variant(base, False),
        "a3 (no mlp recompute)": a3_variant(base, True, recompute_mlp=False),
    }
    shapes = [(2, 64)] if args.quick else [(2, 256), (2, 512)]
    rows = [measure(base, models, b, n, group_size=4, repeats=args.repeats) for b, n in shapes]
    print(
        f"{'model':<22} {'B':>3} {'N':>5} {'time (s)':>9} {'time/AR':>8} {'/AR rc':>7} "
        f"{'MiB':>8} {'mem/AR':>7} {'/AR rc':>7}"
    )
    for r in rows:
        print(
            f"{'ar':<22} {r['batch']:>3} {r['seq_len']:>5} {r['time_s']['ar']:>9.4f} {'':>8} {'':>7} "
            f"{r['peak_bytes']['ar'] / 2**20:>8.1f}"
        )
        for name in ["ar (mlp recompute)", *models]:
            like = (
                (
                    f"{r['time_ratio_vs_ar_recompute'][name]:>6.2f}x",
                    f"{r['memory_ratio_vs_ar_recompute'][name]:>6.2f}x",
                )
                if name in models
                else ("", "")
            )
            print(
                f"{name:<22} {r['batch']:>3} {r['seq_len']:>5} {r['time_s'][name]:>9.4f} "
                f"{r['time_ratio'][name]:>7.2f}x "
                f"{like[0]:>7} {r['peak_bytes'][name] / 2**20:>8.1f} "
                f"{r['memory_ratio'][name]:>6.2f}x {like[1]:>7}"
            )
    print(
        "time/AR, mem/AR: against the plain HF AR step; "
        "/AR rc: against the AR step with the same MLP recomputation"
    )
    if args.profile:
        b, n = shapes[-1]
        steps = step_fns(base, models, b, n, group_size=4)
        for name in ("ar", "a3 (own slot)"):
            print(f"\n== {name} step, B={b} N={n}: top ops by self CPU time, then by self CPU memory ==")
            print(profile_top(steps[name]))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "family": args.family,
        "config": size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "timing": "medians, steps interleaved (ar, a3 own slot, a3 xlnet) on a shared CPU",
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
