"""The ground-truth demo, shortened to a few steps: runs end to end, writes its table, JSON and plot."""

import json
import math
from dataclasses import replace

import pytest
import torch

from a3lm.cli import app
from a3lm.data import synthetic
from a3lm.demo import exact
from a3lm.demo.config import DemoConfig, demo_training, quick_config
from a3lm.demo.generate import oracle_decode
from a3lm.demo.report import summarize
from a3lm.demo.run import held_out_set, run_demo
from a3lm.demo.truth import bos_only, build_table, document_factorizations, true_nlls, verdict
from a3lm.tokenizer import word_tokenizer

ORDERS = [
    "left-to-right",
    "right-to-left",
    "contiguous-2",
    "contiguous-4",
    "random-1",
    "random-2",
    "random-4",
    "infill-middle",
]


def test_factorizations_score_the_words_under_valid_groupings():
    facts = document_factorizations(n_docs=5, length=8, seed=0)
    assert [f.name for f in facts] == ORDERS
    for f in facts:
        assert f.group_ids.shape == f.target_mask.shape == (5, 10)
        assert (f.group_ids[:, :1] < f.group_ids[:, 1:]).all(), "BOS must be the earliest group"
        assert not f.target_mask[:, 0].any() and not f.target_mask[:, -1].any(), (
            "BOS and EOS are never targets"
        )
    infill = facts[-1]
    assert infill.target_mask[0].tolist() == [False] * 3 + [True] * 4 + [False] * 3
    # the known sides come before every blank
    assert infill.group_ids[~infill.target_mask].max() < infill.group_ids[infill.target_mask].min()


def test_bos_only_marks_the_first_group_after_bos():
    facts = {f.name: f for f in document_factorizations(n_docs=3, length=8, seed=0)}
    assert bos_only(facts["left-to-right"])[0].nonzero().squeeze(-1).tolist() == [1]
    assert bos_only(facts["contiguous-4"])[0].nonzero().squeeze(-1).tolist() == [1, 2, 3, 4]
    r2 = facts["random-2"]
    first = r2.group_ids == r2.group_ids.sort(1).values[:, 1:2]  # the group right after BOS (may hold EOS)
    assert torch.equal(bos_only(r2), first & r2.target_mask)
    assert not bos_only(facts["right-to-left"]).any()  # EOS comes right after BOS: words see two keys
    assert not bos_only(facts["infill-middle"]).any()


def test_truth_column_is_the_exact_factorization():
    hmm = synthetic.default_hmm(0)
    words = synthetic.sample_documents(hmm, 20, 8, torch.Generator().manual_seed(0))
    truth = true_nlls(hmm, words, document_factorizations(20, 8, seed=0))
    entropy = float(-exact.joint_logprob(hmm, words).mean()) / 8
    # singletons in any order are the chain rule: all equal the joint's NLL per word
    for name in ("left-to-right", "right-to-left", "random-1"):
        assert truth[name] == pytest.approx(entropy, abs=1e-9)
    # a product of marginals loses information: groups of 4 cost more than groups of 2 here
    assert truth["contiguous-4"] > truth["contiguous-2"] > entropy


def test_quick_demo_runs_end_to_end_with_two_seeds_and_resumes(tmp_path):
    cfg = quick_config(str(tmp_path / "demo"))
    cfg.progress, cfg.seeds = False, 2
    res = run_demo(cfg)
    out = tmp_path / "demo"
    for key in ("markdown", "json", "plot"):
        assert (out / res.files[key].split("/")[-1]).stat().st_size > 0
    assert (out / "nll_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert [r["order"] for r in data["table"]] == ORDERS
    for r in data["table"]:
        assert math.isfinite(r["curriculum"]) and math.isfinite(r["ablation"]) and r["true"] > 0
        assert (r["ar"] is not None) == (r["order"] == "left-to-right")
        for run in ("curriculum", "ablation"):
            seeds = r[f"{run}_gap_seeds"]
            assert len(seeds) == 2 and r[f"{run}_gap"] == pytest.approx(sum(seeds) / 2)
            assert r[f"{run}_gap_sd"] == pytest.approx(abs(seeds[0] - seeds[1]) / 2**0.5)
            lo, hi = r[f"{run}_gap_ci"]
            assert lo <= r[f"{run}_gap"] <= hi and math.isfinite(r[f"{run}_gap_rest"])
    # each seed's runs have their own folders, and were evaluated at step 0, midway and at their end
    a3_total = cfg.a3_steps
    assert set(data["curves"]) == {"0", "1"}
    for s in ("0", "1"):
        assert sorted(int(k) for k in data["curves"][s]["curriculum"]) == [0, a3_total // 2, a3_total]
        assert (out / f"seed{s}" / "ablation" / "final").is_dir()
    # two seeds gave two different curricula (init, data and groupings all differ)
    assert data["table"][0]["curriculum_gap_seeds"][0] != data["table"][0]["curriculum_gap_seeds"][1]
    # a few steps: no target and no verdict, and the report says why
    assert data["summary"]["too_short"] and data["summary"]["target_met"] is None
    assert data["verdict"]["text"] == "too short to mean anything: no verdict"
    assert set(data["generation_stats"]) == {"curriculum", "ablation", "oracle"}
    modes = {s["mode"] for s in data["generation_stats"]["curriculum"]}
    assert (
        any("s=4" in m for m in modes)
        and any("entropy" in m for m in modes)
        and any("infill" in m for m in modes)
    )
    assert all(g["text"] for g in data["generations"])
    md = (out / "results.md").read_text()
    assert "| left-to-right" in md and "## Decoding modes" in md and "Too short to mean anything" in md
    assert " ± " in md and "excluded" in md
    # a rerun resumes (trains nothing) and gives the same table
    again = run_demo(cfg)
    assert [r["curriculum"] for r in again.table] == [r["curriculum"] for r in res.table]


def _fake_logprobs(held_true, facts, shift_per_seed):
    """Model log-probs = the truth minus a per-(seed, document) shift: known gaps for the statistics."""
    return {f.name: held_true[f.name] - shift_per_seed[:, None] * f.target_mask for f in facts}


def test_gap_statistics_and_verdict_on_known_numbers():
    hmm = synthetic.default_hmm(0)
    cfg = DemoConfig(eval_docs=128, seeds=3, bootstrap=200, train=demo_training(length=6))
    held = held_out_set(cfg, hmm, word_tokenizer(hmm.words))
    B = cfg.eval_docs
    docs = torch.linspace(-0.01, 0.01, B, dtype=torch.float64)  # document-to-document noise, mean 0
    # per target word gaps: curriculum 0.02 + 0.01 * seed index; ablation 0.05 + the same document noise
    lps = {}
    for k, s in enumerate(cfg.seed_list):
        lps[(s, "curriculum")] = _fake_logprobs(held.true_lp, held.facts, 0.02 + 0.01 * k + docs)
        lps[(s, "ablation")] = _fake_logprobs(
            held.true_lp, held.facts, torch.full((B,), 0.05, dtype=torch.float64) + docs
        )
    table = build_table(cfg, held, lps, ar_final=[2.0, 2.1, 2.2])
    row = table[0]
    assert row["curriculum_gap"] == pytest.approx(0.03) and row["curriculum_gap_sd"] == pytest.approx(0.01)
    assert row["curriculum_gap_seeds"] == pytest.approx([0.02, 0.03, 0.04])
    lo, hi = row["curriculum_gap_ci"]
    assert 0.029 < lo < 0.03 < hi < 0.031  # resampling documents moves the mean by a little
    assert row["ablation_gap_sd"] == pytest.approx(0.0) and row["ar"] == pytest.approx(2.1)
    assert row["true"] == pytest.approx(true_nlls(hmm, held.words, held.facts)["left-to-right"])
    v = verdict(cfg, held, lps)
    assert v["difference"]["mean"] == pytest.approx(-0.02) and v["text"].startswith(
        "the curriculum is closer"
    )
    # a difference inside the run-to-run spread is no verdict
    for k, s in enumerate(cfg.seed_list):
        lps[(s, "ablation")] = _fake_logprobs(held.true_lp, held.facts, 0.0 + 0.04 * k + docs)
    assert verdict(cfg, held, lps)["text"] == "no difference at this budget"
    one = replace(cfg, seeds=1)
    assert verdict(one, held, lps)["text"].startswith("one seed")
    summary = summarize(table)
    assert summary["worst_gap"] == pytest.approx(0.03) and summary["target_met"] is True


def test_bad_scale_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    with pytest.raises(ValueError, match="--scale must be a positive number"):
        run_demo(replace(quick_config(str(tmp_path)), scale=0))
    result = CliRunner().invoke(app, ["demo", "--quick", "--scale", "-1", "--output", str(tmp_path / "d")])
    assert result.exit_code == 2 and "--scale must be a positive number" in result.output
    assert not (tmp_path / "d").exists()


def test_demo_refuses_a_folder_with_another_configuration(tmp_path):
    cfg = quick_config(str(tmp_path))
    (tmp_path / "demo_config.json").write_text(json.dumps({"seed": 123}))
    with pytest.raises(ValueError, match="different configuration"):
        run_demo(cfg)


def test_demo_command_is_wired():
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "--quick" in result.output and "--scale" in result.output
    assert "--seeds" in result.output


def test_oracle_decoding_with_the_true_conditionals():
    """s=1 left to right with the exact conditionals is ancestral sampling from the source: every sample
    is possible and its average NLL is the entropy; groups of 4 (products of marginals) are not."""
    hmm = synthetic.default_hmm(0)
    n, L = 200, 8
    gen = torch.Generator().manual_seed(0)
    nothing = torch.zeros(n, L, dtype=torch.bool)
    words = oracle_decode(hmm, torch.zeros(n, L, dtype=torch.long), nothing, gen)
    joint = exact.joint_logprob(hmm, words)
    assert torch.isfinite(joint).all()
    reference = synthetic.sample_documents(hmm, 4000, L, torch.Generator().manual_seed(1))
    entropy = float(-exact.joint_logprob(hmm, reference).mean())
    assert abs(float(-joint.mean()) - entropy) < 4 * float(joint.std()) / n**0.5
    grouped = oracle_decode(hmm, torch.zeros(n, L, dtype=torch.long), nothing, gen, group_size=4)
    assert torch.isinf(exact.joint_logprob(hmm, grouped)).sum() > n // 2
    # infilling keeps the known words and fills only the blanks
    held = synthetic.sample_documents(hmm, 5, L, torch.Generator().manual_seed(2))
    known = torch.ones(5, L, dtype=torch.bool)
    known[:, 2:6] = False
    filled = oracle_decode(hmm, held, known, gen, dynamic=True, criterion="entropy")
    assert torch.equal(filled[known], held[known]) and torch.isfinite(exact.joint_logprob(hmm, filled)).all()
