"""GPU-only check: the FlexAttention path (compiled, group-sorted) equals the dense SDPA path on CUDA.

    python bench/check_flex_cuda.py [--dtype bf16|fp32] [--seq-len 512]

Compares logits at every predictable position and the gradients of a training step (FlexAttention
has a backward on CUDA) for random groupings with padding, and for one grouping every sample shares
(stages 1-2: one BlockMask broadcast over the batch). Then, under bf16 autocast as training runs
on GPUs, the step with the gated MLPs' recomputation (`model.GatedDown`) against the step without it.
Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import sys

import torch

from a3lm import groups
from a3lm.model.debug import tiny_a3_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--family", default="llama")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check runs on a GPU only (tests/test_flex.py covers CPU)")
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    atol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    model = tiny_a3_model(
        args.family,
        vocab_size=1024,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2 * args.seq_len,
    ).to("cuda", dtype)
    gen = torch.Generator().manual_seed(0)
    B, N = 4, args.seq_len
    ids = torch.randint(3, 1024, (B, N), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, : N // 4] = 0
    mask[2, -N // 3 :] = 0
    group_ids = groups.random_order(mask, 4, gen)
    ids, mask, group_ids = ids.cuda(), mask.cuda(), group_ids.cuda()
    full = torch.ones_like(mask)
    cases = {
        "random groupings, padding": (mask, group_ids),
        "one shared grouping": (full, groups.contiguous(full, 2)),
    }

    def run(backend: str, mask=mask, group_ids=group_ids):
        model.config.attention_backend = backend
        model.zero_grad(set_to_none=True)
        out = model(
            input_ids=ids, group_ids=group_ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
        )
        out.loss.backward()
        return out.logits.float(), {
            n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None
        }

    ok = True
    for name, (case_mask, case_groups) in cases.items():
        (ref_logits, ref_grads), (logits, grads) = (run(b, case_mask, case_groups) for b in ("sdpa", "flex"))
        targets = groups.predictable(case_groups, case_mask)
        worst = (logits[targets] - ref_logits[targets]).abs().max().item()
        worst_grad = max(
            ((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
            for n in ref_grads
        )
        print(f"{name}: max |logit diff| {worst:.2e} (tol {atol}); max relative grad diff {worst_grad:.2e}")
        ok = ok and worst <= atol and worst_grad <= (5e-2 if dtype == torch.bfloat16 else 1e-3)

    def autocast_step(recompute: bool):
        model.config.recompute_mlp = recompute
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return run("auto")

    (ref_logits, ref_grads), (logits, grads) = autocast_step(False), autocast_step(True)
    logit_diff = (logits - ref_logits).abs().max().item()
    grad_diff = max(
        ((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
        for n in ref_grads
    )
    print(
        f"bf16 autocast, MLP recomputation on vs off: max |logit diff| {logit_diff:.2e} "
        "(the same forward: tol 0); "
        f"max relative grad diff {grad_diff:.2e} (tol 1e-2; 0 on CPU)"
    )
    ok = ok and logit_diff == 0 and grad_diff <= 1e-2
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
