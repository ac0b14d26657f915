"""Two-stream training step vs the plain AR step of the same base model (same B, N, same run).

    python bench/bench_model.py            # hidden 512, 4 layers, vocab 8192, B=2, N=256 and 512
    python bench/bench_model.py --quick    # a small config, seconds

Prints the ratio (A3 fwd+bwd) / (AR fwd+bwd), medians over repeats, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from a3lm import A3ForCausalLM, groups
from a3lm.debug import tiny_base_model


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


def measure(base, a3, batch: int, seq_len: int, group_size: int, repeats: int) -> dict:
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
    mask = torch.ones_like(ids)
    group_ids = groups.random_order(mask, group_size, g)

    def ar_step():
        base.zero_grad(set_to_none=True)
        base(input_ids=ids, labels=ids).loss.backward()

    def a3_step():
        a3.zero_grad(set_to_none=True)
        a3(input_ids=ids, group_ids=group_ids, attention_mask=mask, labels=ids).loss.backward()

    ar, two = interleaved_times([ar_step, a3_step], repeats)
    return {"batch": batch, "seq_len": seq_len, "ar_s": ar, "a3_s": two, "ratio": two / ar}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--family", default="llama")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="bench/results/model.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    size = (
        dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if args.quick
        else dict(
            vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        )
    )
    base = tiny_base_model(args.family, **size).train()
    a3 = A3ForCausalLM.from_base(base).train()
    base.config._attn_implementation = "sdpa"
    shapes = [(2, 64)] if args.quick else [(2, 256), (2, 512)]
    rows = [measure(base, a3, b, n, group_size=4, repeats=args.repeats) for b, n in shapes]
    print(f"{'B':>3} {'N':>5} {'AR step (s)':>12} {'A3 step (s)':>12} {'A3 / AR':>8}")
    for r in rows:
        print(f"{r['batch']:>3} {r['seq_len']:>5} {r['ar_s']:>12.4f} {r['a3_s']:>12.4f} {r['ratio']:>8.2f}x")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"family": args.family, "config": size, "torch": torch.__version__, "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
