"""Training throughput and peak memory: curriculum stage 3 vs a plain AR fine-tuning loop.

Both run the real training loop (`a3lm.train.Trainer`) on the same model, data, batch and optimizer:
"ar" is stage 0 (the base `*ForCausalLM` with its next-token loss), "a3" is stage 3 (the A3 model
built from that base, random groups of size <= 4, BOS first). Each mode runs in its own process so
that peak memory is its own: CUDA max_memory_allocated, or on CPU the peak resident set size
(ru_maxrss) and its growth over the set-up (model, data) before the first step.

    python bench/bench_train.py            # hidden 256, 4 layers, B=16, N=130 on the synthetic corpus
    python bench/bench_train.py --quick    # a small config, seconds
    python bench/bench_train.py --model path/to/llama --data corpus.jsonl -s data.seq_len=1024

Prints tokens/s (median over the timed steps) of both modes, each alone and with their steps
interleaved in one process (the ratio is taken from the interleaved run: both modes see the same
machine load), the ratio a3/ar, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_trainer(mode: str, args: argparse.Namespace, out: str, steps: int):
    from a3lm.training.config import make_config
    from a3lm.training.trainer import Trainer

    stage = "0" if mode == "ar" else "3"
    overrides = [
        *args.size,
        *args.set,
        f"curriculum.stages={stage}",
        f"curriculum.stage{stage}_steps={steps}",
        "optim.warmup_steps=0",
        "optim.decay=constant",
        "log.progress=false",
        "log.every=1",
        f"checkpoint.every={steps + 1}",
    ]
    cfg = make_config(args.model, args.data, out, preset="tiny", overrides=overrides)
    cfg.optim.stage0_lr = cfg.optim.lr  # the same optimizer settings in both modes
    return Trainer(cfg)


def interleaved(args: argparse.Namespace) -> dict:
    """tokens/s of both loops in one process, steps alternating: on a shared, busy machine both
    modes then see the same load, which two separate runs do not."""
    import time

    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    steps = args.warmup + args.steps
    times: dict[str, list[float]] = {"ar": [], "a3": []}
    with tempfile.TemporaryDirectory() as out_ar, tempfile.TemporaryDirectory() as out_a3:
        trainers = {
            "ar": make_trainer("ar", args, out_ar, steps),
            "a3": make_trainer("a3", args, out_a3, steps),
        }
        tokens = {}
        for i in range(steps):
            for mode, trainer in trainers.items():
                t0 = time.perf_counter()
                m = trainer.train_step()
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times[mode].append(time.perf_counter() - t0)
                tokens[mode] = m["step_tokens"]
    return {mode: tokens[mode] / statistics.median(t) for mode, t in times.items()}


def worker(mode: str, args: argparse.Namespace) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(mode, args, out, steps)
        cfg = trainer.cfg
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        setup_rss = rss_mib()
        trainer.fit()
        lines = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        result = {
            "mode": mode,
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in lines[args.warmup :]),
            "final_loss": lines[-1]["loss"],
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "batch": cfg.data.micro_batch_size,
            "seq_len": cfg.data.seq_len,
            "device": str(trainer.device),
        }
        if cuda:
            result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            result["peak_rss_mib"] = peak
            result["peak_over_setup_mib"] = peak - setup_rss
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base decoder path (default: the tiny Llama, random init)")
    p.add_argument("--data", default=None, help="data source (default: the synthetic corpus)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="small model and sequences: seconds")
    p.add_argument("-s", "--set", action="append", default=[], help="extra config override key=value")
    p.add_argument("--out", default="bench/results/train.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.quick:
        args.size = [
            "model.hidden_size=64",
            "data.synthetic_length=32",
            "data.seq_len=34",
            "data.micro_batch_size=8",
        ]
        args.steps, args.warmup = min(args.steps, 10), min(args.warmup, 2)
    elif args.model is None:
        args.size = [
            "model.hidden_size=256",
            "model.num_hidden_layers=4",
            "model.max_position_embeddings=256",
            "data.synthetic_length=128",
            "data.seq_len=130",
            "data.micro_batch_size=16",
        ]
    else:
        args.size = []
    if args.worker:
        print(json.dumps(interleaved(args) if args.worker == "interleaved" else worker(args.worker, args)))
        return

    results = {}
    for mode in ("ar", "a3", "interleaved"):
        cmd = [sys.executable, __file__, "--worker", mode, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    ar, a3, both = results["ar"], results["a3"], results["interleaved"]
    mem = "peak_mem_mib" if "peak_mem_mib" in ar else "peak_over_setup_mib"
    summary = {
        "ar": ar,
        "a3_stage3": a3,
        "interleaved_tokens_per_s": both,
        "throughput_ratio_a3_over_ar": both["a3"] / both["ar"],
        "step_time_ratio_a3_over_ar": both["ar"] / both["a3"],
        "memory_ratio_a3_over_ar": a3[mem] / ar[mem],
        "memory_metric": mem,
    }
    print(f"device {ar['device']}  params {ar['params']:,}  B={ar['batch']}  N={ar['seq_len']}")
    for name, r in (("plain AR", ar), ("A3 stage 3", a3)):
        extra = f"  peak RSS {r['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r else ""
        print(
            f"{name:>11}: {r['tokens_per_s']:10.0f} tokens/s alone, {both[r['mode']]:10.0f} interleaved   "
            f"{mem} {r[mem]:8.1f}{extra}"
        )
    print(
        f"A3 stage 3 / AR: throughput x{summary['throughput_ratio_a3_over_ar']:.2f} "
        f"(step time x{summary['step_time_ratio_a3_over_ar']:.2f}), "
        f"memory x{summary['memory_ratio_a3_over_ar']:.2f}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
