"""Ground truth and the statistics against it: exact NLLs, per-document gaps, bootstrap spreads, the
verdict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from a3lm.data import synthetic
from a3lm.demo import exact
from a3lm.demo.config import DemoConfig
from a3lm.evaluation.nll import Factorization
from a3lm.evaluation.nll import factorizations as row_factorizations
from a3lm.files import read_jsonl
from a3lm.model.likelihood import sequence_logprobs
from a3lm.model.modeling import A3ForCausalLM

# -- factorizations --------------------------------------------------------------------------------


def document_factorizations(n_docs: int, length: int, seed: int) -> list[Factorization]:
    """The table's rows over documents [BOS w_1..w_L EOS]: the words are the targets (EOS is certain
    under the source, so it is known context), random orders drawn once from `seed`."""
    return row_factorizations(n_docs, length + 2, length, seed)


def true_nlls(hmm: synthetic.HMM, words: torch.Tensor, facts: list[Factorization]) -> dict[str, float]:
    """The source's exact NLL per word of every factorization (words [B, L] word indices)."""
    L = words.shape[1]
    return {
        f.name: exact.true_nll(hmm, words, f.group_ids[:, 1 : L + 1], f.target_mask[:, 1 : L + 1]).nll
        for f in facts
    }


# -- evaluation of models --------------------------------------------------------------------------


def bos_only(f: Factorization) -> torch.Tensor:
    """[B, N] bool: targets whose only visible token is BOS (the first group after it).

    These need the marginal p(x_i), which depends on i. With a single visible content key, attention
    alone cannot tell the positions apart (one score softmaxes to 1 wherever the query sits): only
    the query's attention to its own slot (`A3Config.query_self_attention`) carries its position.
    """
    sees = (f.group_ids[:, None, :] < f.group_ids[:, :, None]).sum(-1)  # [B, N]: earlier-group tokens
    return f.target_mask & (sees == 1)


def true_token_logprobs(
    hmm: synthetic.HMM, words: torch.Tensor, facts: list[Factorization]
) -> dict[str, torch.Tensor]:
    """The source's exact log p of every target under every factorization: {name: [B, N]} float64, 0 off
    the targets (rows [BOS w_1..w_L EOS]; words [B, L] word indices)."""
    L = words.shape[1]
    out = {}
    for f in facts:
        lp = torch.zeros(f.target_mask.shape, dtype=torch.float64)
        lp[:, 1 : L + 1] = exact.conditional_logprobs(hmm, words, f.group_ids[:, 1 : L + 1])
        out[f.name] = lp.masked_fill(~f.target_mask, 0.0)
    return out


@torch.no_grad()
def model_token_logprobs(
    model: A3ForCausalLM, ids: torch.Tensor, facts: list[Factorization], batch: int = 256
) -> dict[str, torch.Tensor]:
    """The model's log p of every target under every factorization: {name: [B, N]} float64, 0 off the
    targets."""
    was_training = model.training
    model.eval()
    out = {}
    for f in facts:
        parts = [
            sequence_logprobs(
                model,
                ids[lo : lo + batch],
                f.group_ids[lo : lo + batch],
                target_mask=f.target_mask[lo : lo + batch],
            ).token
            for lo in range(0, ids.shape[0], batch)
        ]
        out[f.name] = torch.cat(parts).double().masked_fill(~f.target_mask, 0.0)
    model.train(was_training)
    return out


def spread(gaps_KB: torch.Tensor, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean, run-to-run spread and evaluation noise of a per-document quantity.

    gaps_KB [K seeds, B documents] (e.g. one document's gap per word) -> the mean over both; `sd`, the
    standard deviation of the per-seed means (None for one seed); `ci`, a 95% bootstrap interval of
    the mean over documents (the same resampled documents for every seed: the held-out set is shared).
    """
    K, B = gaps_KB.shape
    per_seed = gaps_KB.mean(1)
    idx = torch.randint(B, (n_boot, B), generator=torch.Generator().manual_seed(seed))
    boot = gaps_KB[:, idx].mean(-1).mean(0)  # [n_boot]
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return {
        "mean": float(per_seed.mean()),
        "sd": float(per_seed.std()) if K > 1 else None,
        "per_seed": per_seed.tolist(),
        "ci": [lo, hi],
    }


def doc_gaps(model_lp: torch.Tensor, true_lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each document's gap per target word, model NLL - true NLL: [B] from [B, N] log-probs and targets."""
    return ((true_lp - model_lp) * targets).sum(1) / targets.sum(1)


def _load_evals(path: Path) -> dict[int, dict[str, float]]:
    if not path.exists():
        return {}
    return {r["step"]: r["nll"] for r in read_jsonl(path)}  # a torn last line (a kill mid-append) is dropped


def _eval_steps(total: int, points: int) -> set[int]:
    return {0, total} | {round(total * k / points) for k in range(1, points)}


def build_table(
    cfg: DemoConfig, held: HeldOut, lps: dict[tuple[int, str], dict[str, torch.Tensor]], ar_final: list[float]
) -> list[dict]:
    """One row per factorization: the truth, and per run the NLL and the gap (mean, spread, bootstrap
    interval over documents, and the gap past the BOS-only first group)."""
    table = []
    for f in held.facts:
        true = held.truth(f.name)
        row: dict[str, Any] = {
            "order": f.name,
            "description": f.description,
            "true": true,
            "ar": sum(ar_final) / len(ar_final) if f.name == "left-to-right" else None,
        }
        rest = f.target_mask & ~bos_only(f)
        for run in ("curriculum", "ablation"):
            per_seed = [lps[(s, run)][f.name] for s in cfg.seed_list]
            gaps = torch.stack(
                [doc_gaps(lp, held.true_lp[f.name], f.target_mask) for lp in per_seed]
            )  # [K, B]
            st = spread(gaps, cfg.bootstrap)
            row[run] = true + st["mean"]
            row[f"{run}_gap"] = st["mean"]
            row[f"{run}_gap_sd"], row[f"{run}_gap_ci"], row[f"{run}_gap_seeds"] = (
                st["sd"],
                st["ci"],
                st["per_seed"],
            )
            row[f"{run}_gap_rest"] = sum(
                float(((held.true_lp[f.name] - lp) * rest).sum() / rest.sum()) for lp in per_seed
            ) / len(per_seed)
        table.append(row)
    return table


def verdict(
    cfg: DemoConfig, held: HeldOut, lps: dict[tuple[int, str], dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """Curriculum vs ablation: the difference of their gaps averaged over the table's factorizations,
    paired by seed and document; stated only when it exceeds both the run-to-run spread and the
    evaluation noise."""
    diffs = []
    for s in cfg.seed_list:
        d = [
            doc_gaps(lps[(s, "curriculum")][f.name], held.true_lp[f.name], f.target_mask)
            - doc_gaps(lps[(s, "ablation")][f.name], held.true_lp[f.name], f.target_mask)
            for f in held.facts
        ]
        diffs.append(torch.stack(d).mean(0))
    st = spread(torch.stack(diffs), cfg.bootstrap)
    lo, hi = st["ci"]
    if cfg.too_short:
        text = "too short to mean anything: no verdict"
    elif st["sd"] is None:
        text = "one seed: the run-to-run spread is not measured, so no verdict (use --seeds 3)"
    elif abs(st["mean"]) > st["sd"] and (lo > 0 or hi < 0):
        text = (
            "the curriculum is closer to the truth than the stage-3-only ablation"
            if st["mean"] < 0
            else "the stage-3-only ablation is closer to the truth than the curriculum"
        )
    else:
        text = "no difference at this budget"
    return {"difference": st, "text": text}


@dataclass
class HeldOut:
    """The held-out set every run is scored on: documents, token rows, factorizations, exact log-probs."""

    words: torch.Tensor  # [B, L] word indices
    ids: torch.Tensor  # [B, L + 2] token rows [BOS w.. EOS]
    facts: list[Factorization]
    true_lp: dict[str, torch.Tensor]  # {factorization: [B, L + 2]} exact log p of the targets

    def truth(self, name: str) -> float:
        f = next(f for f in self.facts if f.name == name)
        return float(-self.true_lp[name].sum() / f.target_mask.sum())


def held_out_set(cfg: DemoConfig, hmm: synthetic.HMM, tokenizer: Any) -> HeldOut:
    """Documents from a seed no training run reads (the same for every seed of a `--seeds` run)."""
    L, n = cfg.length, cfg.eval_docs
    words = synthetic.sample_documents(hmm, n, L, torch.Generator().manual_seed(10_000 + cfg.seed))
    word_to_token = torch.tensor(tokenizer.convert_tokens_to_ids(hmm.words))
    ids = torch.cat(
        [
            torch.full((n, 1), tokenizer.bos_token_id),
            word_to_token[words],
            torch.full((n, 1), tokenizer.eos_token_id),
        ],
        dim=1,
    )
    facts = document_factorizations(n, L, seed=cfg.seed)
    return HeldOut(words, ids, facts, true_token_logprobs(hmm, words, facts))
