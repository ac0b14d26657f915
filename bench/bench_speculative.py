"""Speculative decoding on the synthetic HMM source: a trained model's acceptance against the oracle's.

    python bench/bench_speculative.py --model runs/demo/seed0/curriculum/final  # a model trained on the HMM
    python bench/bench_speculative.py                                           # the oracle alone

For each order (left to right, random, infilling the middle half) and draft window k, temperature 1:
draft acceptance (accepted / verified drafts) and tokens per forward, for the model (a3lm's
speculative decoder) and for the oracle: the same loop with the source's exact conditionals
(forward-backward, `a3lm.exact`) in place of the model, i.e. the ceiling a perfect model reaches.
Tokens per forward is then what the acceptance buys; the draft window bounds it by k.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from a3lm.data import synthetic
from a3lm.decoding.api import infill, sample
from a3lm.decoding.canvas import Canvas, scatter_where
from a3lm.decoding.config import DecodingConfig
from a3lm.decoding.speculative import _Drafts, _next_drafts, _verify, _Window
from a3lm.demo import exact

ORDERS = ("left-to-right", "random", "infilling")


def _known(n: int, length: int, order: str) -> torch.Tensor:
    """[n, length] known words: none, or all but the middle half when infilling."""
    known = torch.zeros(n, length, dtype=torch.bool)
    if order == "infilling":
        known[:, : length // 4] = known[:, length - length // 4 :] = True
    return known


@torch.no_grad()
def oracle(hmm, words: torch.Tensor, known: torch.Tensor, order: str, k: int, seed: int = 0) -> dict:
    """a3lm.speculative's loop with the source's exact conditionals as the query rows:
    {acceptance, tokens_per_forward}."""
    n, L = words.shape
    gen = torch.Generator().manual_seed(seed)
    D = k - 1
    canvas = Canvas(
        words.clone(),
        torch.ones_like(known),
        known,
        torch.arange(L).expand(n, L),
        known.clone(),
        torch.where(known, 0, -1),
        torch.where(known, 0, -1),
        torch.zeros(n, dtype=torch.bool),
        torch.zeros_like(known),
    )
    window = _Window(canvas, DecodingConfig(order="random" if order == "random" else "left-to-right"), gen)
    done = torch.zeros(n, dtype=torch.long)
    cols, _ = window.at(done, D)
    d = _Drafts(
        cols[:, :0],
        cols[:, :0].bool(),
        cols,
        torch.zeros_like(cols),
        torch.zeros_like(cols, dtype=torch.bool),
    )
    no_cache = SimpleNamespace(cache=None)
    forwards_B = torch.zeros(n, dtype=torch.long)
    drafted = accepted = step = 0

    def rows_at(words_, filled_, cols_):  # exact p(x_col | filled words) [n, C, W]
        post = exact.posterior_word_logprobs(hmm, words_, filled_).exp().float()
        # evidence the source cannot produce (after a draft it gives probability 0, which is always
        # rejected): such rows are never verified against, only proposed from; make them uniform
        post = torch.where(torch.isfinite(post).all(-1, keepdim=True), post, 1.0 / post.shape[-1])
        return post.gather(1, cols_[..., None].expand(-1, -1, post.shape[-1]))

    while True:
        n_valid = d.valid.sum(1)
        next_cols, next_valid = window.at(done + n_valid, k)
        if not bool(next_valid.any() | d.valid.any()):
            break
        step += 1
        forwards_B += next_valid.any(1) | d.valid.any(1)
        rows, w, f = [], canvas.ids, canvas.filled
        for m in range(D):  # draft m's row sees the committed words and drafts 1..m-1
            rows.append(rows_at(w, f, d.cols[:, m : m + 1]))
            w = scatter_where(w, d.cols[:, m : m + 1], d.valid[:, m : m + 1], d.tokens[:, m : m + 1])
            f = scatter_where(f, d.cols[:, m : m + 1], d.valid[:, m : m + 1], True)
        probs = torch.cat([*rows, rows_at(w, f, next_cols)], dim=1)
        committed, rejected, residual_col = _verify(
            canvas, no_cache, d, probs[:, :D], canvas.group[:, :1].expand(-1, D), done, step, gen
        )
        drafted, accepted = drafted + int(d.valid.sum()), accepted + int((committed - rejected.long()).sum())
        done = done + committed
        d, done = _next_drafts(
            canvas, probs, done, rejected, residual_col, next_cols, next_valid, step, gen, None
        )
    return {
        "acceptance": accepted / max(drafted, 1),
        "tokens_per_forward": int((~known).sum()) / int(forwards_B.sum()),
    }


@torch.no_grad()
def model_row(model, tokenizer, hmm, words: torch.Tensor, known: torch.Tensor, order: str, k: int) -> dict:
    """a3lm's speculative decoder on rows [BOS w_1..w_L]: {acceptance, tokens_per_forward}."""
    n, L = words.shape
    token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(hmm.words))
    bos = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
    kw = dict(speculative=k, temperature=1.0, seed=0)
    if order == "infilling":
        ids = torch.cat([bos, token_ids[words]], dim=1)
        out = infill(model, ids, torch.cat([torch.ones(n, 1, dtype=torch.bool), known], dim=1), **kw)
    else:
        out = sample(model, bos, length=L, order=order, stop_at_eos=False, **kw)
    forwards_B = out.fill_step.max(1).values  # a row's last forward commits a token
    return {
        "acceptance": out.accepted / max(out.drafted, 1),
        "tokens_per_forward": int((~known).sum()) / int(forwards_B.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="An A3 checkpoint trained on the synthetic HMM (with its tokenizer)."
    )
    parser.add_argument("--hmm-seed", type=int, default=0)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--output", default="bench/results/speculative_hmm.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hmm = synthetic.default_hmm(args.hmm_seed)
    held = synthetic.sample_documents(hmm, args.samples, args.length, torch.Generator().manual_seed(10_000))
    model = tokenizer = None
    if args.model:
        from a3lm.decoding.api import load_pretrained

        model, tokenizer = load_pretrained(args.model)
    rows = []
    print(
        f"HMM seed {args.hmm_seed}, {args.samples} rows of {args.length} words, temperature 1 "
        "(tokens per forward: generated tokens / forwards each row took part in)"
    )
    print(
        f"{'order':<14} {'k':>3} {'oracle accept':>13} {'oracle tok/fwd':>14} "
        f"{'model accept':>12} {'model tok/fwd':>13}"
    )
    for order in ORDERS:
        known = _known(args.samples, args.length, order)
        for k in map(int, args.ks.split(",")):
            o = oracle(hmm, held, known, order, k)
            m = model_row(model, tokenizer, hmm, held, known, order, k) if model is not None else None
            rows.append({"order": order, "k": k, "oracle": o, "model": m})
            mm = f"{m['acceptance']:>12.3f} {m['tokens_per_forward']:>13.2f}" if m else ""
            print(
                f"{order:<14} {k:>3} {o['acceptance']:>13.3f} {o['tokens_per_forward']:>14.2f} {mm}",
                flush=True,
            )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "hmm_seed": args.hmm_seed, "rows": rows}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
