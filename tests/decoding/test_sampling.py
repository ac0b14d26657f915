"""Decoding: exact cache, agreement with the likelihood, infilling, dynamic resampling, batching, EOS."""

import itertools

import pytest
import torch

from a3lm.decoding.api import infill, sample
from a3lm.decoding.groupwise import group_schedule
from a3lm.decoding.text import encode_with_blanks, parse_blanks, render_fill_order, sample_text
from a3lm.decoding.tokens import criterion_scores, filter_logits
from a3lm.groups import PAD_GROUP, fill_groups, infill_groups, left_to_right
from a3lm.model.debug import tiny_a3_model, tiny_bpe_tokenizer
from a3lm.model.likelihood import sequence_logprobs
from a3lm.tokenizer import word_tokenizer

# two prompts of different lengths, left-padded (the sampler accepts either side)
PROMPTS = torch.tensor([[0, 0, 1, 7, 9], [1, 4, 5, 6, 8]])
PROMPT_MASK = (PROMPTS != 0).long()

MODES = {
    "s1-ltr": dict(group_size=1),
    "s2-ltr": dict(group_size=2),
    "s4-ltr": dict(group_size=4),
    "s1-random": dict(group_size=1, order="random"),
    "s2-random": dict(group_size=2, order="random"),
    "s4-random": dict(group_size=4, order="random"),
    "dyn-confidence": dict(dynamic=True, criterion="confidence", per_step=2),
    "dyn-margin": dict(dynamic=True, criterion="margin", per_step=3),
    "dyn-entropy": dict(dynamic=True, criterion="entropy", per_step=1),
    "dyn-random": dict(dynamic=True, criterion="random", per_step=2),
    "dyn-threshold": dict(dynamic=True, criterion="confidence", threshold=0.06),
    "spec3-ltr": dict(speculative=3),
    "spec2-random": dict(speculative=2, order="random"),
}


def _sharp_model(family: str, **kwargs):
    """A tiny model whose distributions are far from uniform (so orders and criteria matter)."""
    model = tiny_a3_model(family, **kwargs)
    with torch.no_grad():
        model.lm_head.weight.mul_(16)
    return model


# Gemma 2's debug weights are drawn at std 0.1 (so that its soft-caps bite): float32 error near 1e-5
FAMILY_ATOL = {"gemma2": 5e-5}


def _assert_same_run(a, b, atol=1e-5):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.fill_step, b.fill_step)
    assert a.num_steps == b.num_steps == len(a.step_logits) == len(b.step_logits)
    for x, y in zip(a.step_logits, b.step_logits, strict=True):
        assert torch.equal(x.positions_BQ, y.positions_BQ)
        valid = x.positions_BQ >= 0
        torch.testing.assert_close(x.logits_BQV[valid], y.logits_BQV[valid], atol=atol, rtol=0)


def _infill_batch():
    """Two rows, different blank layouts, the second right-padded."""
    ids = torch.tensor([[1, 5, 6, 0, 0, 0, 9, 10, 0, 11], [1, 0, 0, 7, 8, 0, 0, 0, 0, 0]])
    known = torch.tensor([[1, 1, 1, 0, 0, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 0, 0, 0, 0, 0]]).bool()
    mask = torch.tensor([[1] * 10, [1] * 7 + [0] * 3])
    return ids, known, mask


# -- 1. cached == uncached -------------------------------------------------------------------------


def _cached_and_uncached(model, mode: str):
    return [
        sample(
            model,
            PROMPTS,
            PROMPT_MASK,
            length=9,
            temperature=0,
            seed=3,
            stop_at_eos=False,
            output_logits=True,
            use_cache=use_cache,
            **MODES[mode],
        )
        for use_cache in (True, False)
    ]


@pytest.mark.parametrize("mode", list(MODES))
def test_cached_equals_uncached(family, mode):
    runs = _cached_and_uncached(_sharp_model(family), mode)
    _assert_same_run(*runs, atol=FAMILY_ATOL.get(family, 1e-5))
    assert bool((runs[0].fill_step[runs[0].attention_mask.bool()] >= 0).all())


@pytest.mark.parametrize("mode", ["s2-random", "dyn-confidence", "spec3-ltr"])
def test_cached_equals_uncached_without_own_slot(mode):
    """XLNet's rule (no own slot): the cached step's mask then leaves the query slots' keys out."""
    model = _sharp_model("llama")
    model.config.query_self_attention = False
    _assert_same_run(*_cached_and_uncached(model, mode))


@pytest.mark.parametrize("mode", ["s1-ltr", "s2-random", "dyn-margin"])
def test_cached_equals_uncached_infill(family, mode):
    model = _sharp_model(family)
    ids, known, mask = _infill_batch()
    runs = [
        infill(model, ids, known, mask, temperature=0, seed=1, output_logits=True, use_cache=c, **MODES[mode])
        for c in (True, False)
    ]
    _assert_same_run(*runs, atol=FAMILY_ATOL.get(family, 1e-5))


def test_cached_equals_uncached_when_sampling():
    """Same seed, same draws: temperature / top-k / top-p sampling gives the same tokens with and
    without cache."""
    model = _sharp_model("llama")
    kw = dict(
        length=12,
        group_size=2,
        order="random",
        temperature=0.8,
        top_k=10,
        top_p=0.9,
        seed=7,
        output_logits=True,
    )
    runs = [sample(model, PROMPTS, PROMPT_MASK, use_cache=c, stop_at_eos=False, **kw) for c in (True, False)]
    _assert_same_run(*runs)


# -- 2. the sampler draws from the model's distribution ---------------------------------------------


def test_samples_match_likelihood():
    """Chi-square of many samples (fixed grouping: {3, 1} then {2}) against exp(sequence_logprobs)."""
    model = _sharp_model("llama", vocab_size=4)
    n, length, V = 12000, 3, 4
    out = sample(
        model,
        torch.ones(n, 1, dtype=torch.long),
        length=length,
        group_size=2,
        order=torch.tensor([2, 0, 1]),
        stop_at_eos=False,
        seed=0,
    )
    group_ids = out.group_ids[:1]
    assert group_ids.tolist() == [[0, 1, 2, 1]] and bool((out.group_ids == group_ids).all())

    every = torch.tensor([[1, *c] for c in itertools.product(range(V), repeat=length)])  # [V^3, 4]
    code = (out.sequences[:, 1:] * torch.tensor([V * V, V, 1])).sum(1)  # row of `every` each sample is
    observed = torch.bincount(code, minlength=V**length).double()

    def p_value(probs: torch.Tensor) -> float:
        expected = probs.double() * n
        big = expected >= 5  # pool the rare cells so the chi-square approximation holds
        rare = [observed[~big].sum()[None], expected[~big].sum()[None]] if bool((~big).any()) else [[], []]
        obs = torch.cat([observed[big], torch.as_tensor(rare[0], dtype=torch.float64)])
        exp = torch.cat([expected[big], torch.as_tensor(rare[1], dtype=torch.float64)])
        stat = ((obs - exp) ** 2 / exp).sum()
        df = torch.tensor((obs.numel() - 1) / 2, dtype=torch.float64)
        return float(torch.special.gammaincc(df, stat / 2))

    probs = sequence_logprobs(model, every, group_ids.expand(len(every), -1)).total.exp()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    assert p_value(probs) > 1e-3
    # the test has power: the same samples reject another factorization of the same model
    ltr = sequence_logprobs(model, every, left_to_right(torch.ones_like(every))).total.exp()
    assert p_value(ltr) < 1e-6


def test_top_k_top_p_and_temperature_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert filter_logits(logits, top_k=2).softmax(-1).tolist()[0][2:] == [0.0, 0.0]
    # nucleus 0.7: 0.5 alone holds < 0.7, so 0.3 joins; 0.15 is dropped
    kept = filter_logits(logits, top_p=0.7).softmax(-1)
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    cold = filter_logits(logits, temperature=0.5).softmax(-1)
    torch.testing.assert_close(cold, (logits * 2).softmax(-1))


def test_top_k_one_is_greedy():
    model = _sharp_model("qwen2")
    greedy = sample(model, PROMPTS, PROMPT_MASK, length=8, group_size=2, temperature=0, stop_at_eos=False)
    top1 = sample(
        model,
        PROMPTS,
        PROMPT_MASK,
        length=8,
        group_size=2,
        temperature=1.5,
        top_k=1,
        seed=5,
        stop_at_eos=False,
    )
    assert torch.equal(greedy.sequences, top1.sequences)


def test_seed_reproducible():
    model = _sharp_model("llama")
    a, b, c = (
        sample(model, PROMPTS, PROMPT_MASK, length=10, order="random", seed=s, stop_at_eos=False)
        for s in (4, 4, 5)
    )
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.fill_step, b.fill_step)
    assert not (torch.equal(a.sequences, c.sequences) and torch.equal(a.fill_step, c.fill_step))


# -- 3. infilling and dynamic resampling -------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True])
def test_infill_keeps_known_tokens(core_family, dynamic):
    model = _sharp_model(core_family)
    ids, known, mask = _infill_batch()
    options = dict(dynamic=True, per_step=2) if dynamic else dict(group_size=2, order="random")
    out = infill(model, ids, known, mask, seed=0, **options)
    assert torch.equal(out.sequences[known], ids[known])
    assert torch.equal(out.attention_mask, mask)
    blanks = mask.bool() & ~known
    assert bool((out.fill_step[blanks] >= 1).all()) and bool((out.fill_step[known] == 0).all())
    # every known token comes before every blank; known tokens are left-to-right singletons
    for b in range(2):
        g_known, g_blank = out.group_ids[b][known[b]], out.group_ids[b][blanks[b]]
        assert g_known.tolist() == list(range(int(known[b].sum())))
        assert int(g_blank.min()) > int(g_known.max())
    # two per step, fewer on each row's last step
    for b in range(2):
        counts = torch.bincount(out.fill_step[b][blanks[b]]).tolist()[1:]
        assert counts == [2] * (int(blanks[b].sum()) // 2) + ([1] if int(blanks[b].sum()) % 2 else [])


@pytest.mark.parametrize("criterion", ["confidence", "margin", "entropy"])
def test_dynamic_commits_k_best_by_criterion(core_family, criterion):
    model = _sharp_model(core_family)
    k, length = 3, 10
    out = sample(
        model,
        PROMPTS,
        PROMPT_MASK,
        length=length,
        dynamic=True,
        criterion=criterion,
        per_step=k,
        temperature=0,
        stop_at_eos=False,
        output_logits=True,
    )
    assert out.num_steps == -(-length // k)
    for t, step in enumerate(out.step_logits, start=1):
        scores = criterion_scores(criterion, step.logits_BQV.softmax(-1))
        for b in range(2):
            valid = step.positions_BQ[b] >= 0
            committed = set((out.fill_step[b] == t).nonzero().squeeze(-1).tolist())
            assert len(committed) == min(k, length - (t - 1) * k)
            best = scores[b][valid].topk(len(committed)).indices
            assert committed == set(step.positions_BQ[b][valid][best].tolist())
            # every slot scored was unfilled before this step: each step scores all of them
            assert int(valid.sum()) == length - (t - 1) * k


def test_dynamic_threshold_commits_all_confident():
    model = _sharp_model("llama")
    p = 0.08
    out = sample(
        model,
        PROMPTS,
        PROMPT_MASK,
        length=10,
        dynamic=True,
        threshold=p,
        temperature=0,
        stop_at_eos=False,
        output_logits=True,
    )
    for t, step in enumerate(out.step_logits, start=1):
        conf = step.logits_BQV.softmax(-1).max(-1).values
        for b in range(2):
            valid = step.positions_BQ[b] >= 0
            if not bool(valid.any()):
                continue
            committed = set((out.fill_step[b] == t).nonzero().squeeze(-1).tolist())
            above = set(step.positions_BQ[b][valid & (conf[b] >= p)].tolist())
            best = int(step.positions_BQ[b][conf[b].masked_fill(~valid, -1).argmax()])
            assert committed == above | {best}


def test_dynamic_random_is_seeded():
    model = _sharp_model("llama")
    kw = dict(length=10, dynamic=True, criterion="random", per_step=2, temperature=0, stop_at_eos=False)
    a, b = (sample(model, PROMPTS, PROMPT_MASK, seed=11, **kw) for _ in range(2))
    c = sample(model, PROMPTS, PROMPT_MASK, seed=12, **kw)
    assert torch.equal(a.fill_step, b.fill_step) and not torch.equal(a.fill_step, c.fill_step)


# -- 4. batched == one by one ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["s1-ltr", "s2-ltr", "dyn-confidence", "dyn-threshold", "spec3-ltr"])
def test_batched_equals_one_by_one(core_family, mode):
    model = _sharp_model(core_family)
    prompts = [[1, 4], [1, 5, 6, 7, 8], [1, 9, 10]]
    right_padded = torch.tensor([p + [0] * (5 - len(p)) for p in prompts])
    batched = sample(
        model,
        right_padded,
        (right_padded != 0).long(),
        length=7,
        temperature=0,
        stop_at_eos=False,
        **MODES[mode],
    )
    for b, p in enumerate(prompts):
        single = sample(model, torch.tensor([p]), length=7, temperature=0, stop_at_eos=False, **MODES[mode])
        n = len(p) + 7
        assert torch.equal(batched.sequences[b, :n], single.sequences[0])
        assert torch.equal(batched.fill_step[b, :n], single.fill_step[0])
        assert bool((batched.attention_mask[b, n:] == 0).all())


def test_batched_infill_equals_one_by_one():
    model = _sharp_model("llama")
    ids, known, mask = _infill_batch()
    batched = infill(model, ids, known, mask, group_size=2, temperature=0)
    for b in range(2):
        n = int(mask[b].sum())
        single = infill(model, ids[b : b + 1, :n], known[b : b + 1, :n], group_size=2, temperature=0)
        assert torch.equal(batched.sequences[b, :n], single.sequences[0])


def _row_generators(rows) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + b) for b in rows]


RANDOM_MODES = [
    dict(order="random", group_size=2),
    dict(order="random-blocks", group_size=2),
    dict(order="random", speculative=3),
]


@pytest.mark.parametrize("mode", RANDOM_MODES)
def test_random_order_per_row_is_batch_independent(mode):
    """order_generators: greedy decoding in a random order gives each prompt the tokens and fill order it
    gets alone, whatever its batch, padding and shared seed (7 blanks: not a multiple of the group size)."""
    model = _sharp_model("llama")
    prompts = [[1, 4], [1, 5, 6, 7, 8], [1, 9, 10]]
    left_padded = torch.tensor([[0] * (5 - len(p)) + p for p in prompts])
    kw = dict(length=7, temperature=0, stop_at_eos=False, **mode)
    batched = sample(
        model,
        left_padded,
        (left_padded != 0).long(),
        order_generators=_row_generators(range(3)),
        seed=0,
        **kw,
    )
    for b, p in enumerate(prompts):
        single = sample(model, torch.tensor([p]), order_generators=_row_generators([b]), seed=1, **kw)
        n = len(p) + 7
        assert torch.equal(batched.sequences[b, :n], single.sequences[0])
        assert torch.equal(batched.fill_step[b, :n], single.fill_step[0])
        steps = single.fill_step[0, len(p) :].tolist()
        assert steps != sorted(steps)  # a random order, not left to right


@pytest.mark.parametrize("mode", RANDOM_MODES)
def test_random_order_per_row_infill_is_batch_independent(mode):
    model = _sharp_model("llama")
    ids, known, mask = _infill_batch()
    batched = infill(
        model, ids, known, mask, temperature=0, order_generators=_row_generators(range(2)), seed=0, **mode
    )
    for b in range(2):
        n = int(mask[b].sum())
        single = infill(
            model,
            ids[b : b + 1, :n],
            known[b : b + 1, :n],
            temperature=0,
            order_generators=_row_generators([b]),
            seed=1,
            **mode,
        )
        assert torch.equal(batched.sequences[b, :n], single.sequences[0])
        assert torch.equal(batched.fill_step[b, :n], single.fill_step[0])


@pytest.mark.parametrize("order", ["left-to-right", "right-to-left", "random", "random-blocks"])
def test_decoding_groups_are_the_builders_groups(order):
    """Group-wise decoding and the group builders share one order function: with the same seed, the
    factorization a decoder reports is `groups.infill_groups` of its known tokens (the generator's
    first draw is the order)."""
    model = _sharp_model("llama")
    ids, known, mask = _infill_batch()
    runs = [
        infill(model, ids, known, mask, group_size=2, order=order, seed=5),
        sample(model, PROMPTS, PROMPT_MASK, length=7, group_size=2, order=order, seed=5, stop_at_eos=False),
    ]
    for out in runs:
        given = out.fill_step == 0
        gen = torch.Generator().manual_seed(5)
        assert torch.equal(out.group_ids, infill_groups(given, out.attention_mask, 2, order, gen))


@pytest.mark.parametrize("order, size", [("random", 3), ("random-blocks", 2), ("right-to-left", 1)])
def test_group_schedule_lists_each_group(order, size):
    """Step t of the schedule holds exactly the columns of every row's group t, left to right."""
    fill = torch.rand(3, 17, generator=torch.Generator().manual_seed(0)) < 0.6
    fill[2] = False
    fill[2, 4] = True  # a row with one blank: no group after the first
    fill_group = fill_groups(fill, order, size, torch.Generator().manual_seed(1))
    schedule = group_schedule(fill_group)
    assert len(schedule) == int(fill_group.max()) + 1
    for t, (cols, valid) in enumerate(schedule):
        for b in range(3):
            expected = (fill_group[b] == t).nonzero().flatten()
            assert torch.equal(cols[b][valid[b]], expected)


def test_custom_order_per_row():
    model = _sharp_model("llama")
    order = [torch.tensor([3, 0, 2, 1]), torch.tensor([1, 2, 3, 0])]
    out = sample(model, PROMPTS, PROMPT_MASK, length=4, order=order, temperature=0, stop_at_eos=False)
    for b in range(2):
        start = int(PROMPT_MASK[b].sum())
        assert out.fill_step[b, start : start + 4][order[b]].tolist() == [1, 2, 3, 4]


# -- EOS -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["s1-ltr", "s2-random", "dyn-confidence", "spec3-ltr"])
def test_eos_stops_and_pads(mode):
    model = _sharp_model("llama")
    prompt = torch.tensor([[1, 7, 9]])
    free = sample(model, prompt, length=12, temperature=0, stop_at_eos=False, **MODES[mode], seed=2)
    gen = free.sequences[0, 3:]
    eos = int(gen[4])  # call a token the model produces "EOS"
    cut = 3 + int((gen == eos).nonzero()[0])  # its first occurrence
    out = sample(model, prompt, length=12, temperature=0, eos_token_id=eos, **MODES[mode], seed=2)
    assert torch.equal(out.sequences[0, : cut + 1], free.sequences[0, : cut + 1])
    assert out.attention_mask[0].tolist() == [1] * (cut + 1) + [0] * (15 - cut - 1)
    assert bool((out.sequences[0, cut + 1 :] == 0).all()) and bool((out.fill_step[0, cut + 1 :] == -1).all())
    assert bool((out.group_ids[0, cut + 1 :] == PAD_GROUP).all())
    if mode == "s1-ltr":
        assert out.num_steps == cut + 1 - 3  # it stopped at the EOS


def _drawn_logprobs(out) -> dict[int, float]:
    """Column -> log p of the token committed there, under the step logits it was drawn from (row 0)."""
    drawn = {}
    for t, step in enumerate(out.step_logits, start=1):
        for q, col in enumerate(step.positions_BQ[0].tolist()):
            if col >= 0 and int(out.fill_step[0, col]) == t:
                drawn[col] = float(step.logits_BQV[0, q].log_softmax(-1)[out.sequences[0, col]])
    return drawn


@pytest.mark.parametrize("mode", ["s1-random", "dyn-random"])
def test_eos_cut_keeps_the_untruncated_sample_that_scores_exactly(mode):
    # out of order, a token after the first EOS may be committed before it and be context of kept tokens:
    # `untruncated` holds the whole sample, which its group ids score exactly
    model = _sharp_model("llama", vocab_size=8)
    prompt = torch.tensor([[1, 4]])
    cut_runs = 0
    for seed in range(24):
        out = sample(model, prompt, length=8, eos_token_id=2, seed=seed, output_logits=True, **MODES[mode])
        eos_cols = ((out.sequences[0] == 2) & (out.fill_step[0] > 0)).nonzero()
        if out.untruncated is None:
            continue
        cut_runs += 1
        whole, cut = out.untruncated, int(eos_cols[0])
        assert out.attention_mask[0, cut + 1 :].sum() == 0 and whole.attention_mask[0, cut + 1 :].sum() > 0
        assert torch.equal(whole.sequences[0, : cut + 1], out.sequences[0, : cut + 1])
        drawn = _drawn_logprobs(whole)
        rescored = sequence_logprobs(
            model, whole.sequences, whole.group_ids, whole.attention_mask, position_ids=whole.position_ids
        ).token[0]
        assert sorted(drawn) == (whole.fill_step[0] > 0).nonzero().squeeze(-1).tolist()
        for col, logp in drawn.items():
            assert float(rescored[col]) == pytest.approx(logp, abs=1e-5)
        # once the EOS is committed, nothing after it is scored again
        eos_step = int(out.fill_step[0, cut])
        for step in out.step_logits[eos_step:]:
            assert int(step.positions_BQ[0].max()) <= cut
    assert cut_runs >= 3


def test_eos_token_id_list_stops_at_any_of_them():
    model = _sharp_model("llama", vocab_size=16)
    prompt = torch.tensor([[1, 4, 5]])
    free = sample(model, prompt, length=6, temperature=0, stop_at_eos=False)
    eos = int(free.sequences[0, 4])
    unused = next(t for t in range(4, 16) if t not in free.sequences[0].tolist())
    single = sample(model, prompt, length=6, temperature=0, eos_token_id=eos)
    model.config.text_config.eos_token_id = [unused, eos]  # as Llama 3 lists several
    listed = sample(model, prompt, length=6, temperature=0)
    assert int(single.attention_mask.sum()) == int((free.sequences[0] == eos).nonzero()[0]) + 1 < 9
    assert torch.equal(listed.sequences, single.sequences)


@pytest.mark.parametrize("options", [dict(top_k=1), dict(top_p=0.3), dict(top_k=2, top_p=0.5)])
def test_dynamic_criteria_score_the_model_not_the_filter(options):
    # greedy: the filters leave every argmax as it is, and the criteria read the model's distribution
    model = _sharp_model("llama")
    kw = dict(length=10, dynamic=True, temperature=0, stop_at_eos=False)
    for dynamic in (
        dict(criterion="confidence", per_step=2),
        dict(criterion="entropy", per_step=3),
        dict(threshold=0.3),
    ):
        plain = sample(model, PROMPTS, PROMPT_MASK, **kw, **dynamic)
        filtered = sample(model, PROMPTS, PROMPT_MASK, **kw, **dynamic, **options)
        assert torch.equal(plain.sequences, filtered.sequences) and torch.equal(
            plain.fill_step, filtered.fill_step
        )


# -- errors and text helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(length=200), "exceeds the model's maximum"),
        (dict(length=4, order="sideways"), "unknown order"),
        (dict(length=4, dynamic=True, criterion="luck"), "unknown criterion"),
        (dict(length=4, dynamic=True, per_step=0), "per_step"),
        (dict(length=4, dynamic=True, threshold=0.0), r"threshold must lie in \(0, 1\)"),
        (dict(length=4, dynamic=True, threshold=1.0), r"threshold must lie in \(0, 1\)"),
        (dict(length=4, dynamic=True, threshold=0.5, criterion="entropy"), "confidence or margin"),
        (dict(length=4, dynamic=True, threshold=0.5, per_step=2), "not both"),
        (dict(length=4, group_size=0), "group size"),
        (dict(length=0), "length"),
        (dict(length=4, order=torch.tensor([0, 1, 1, 2])), "permutation"),
        (dict(length=4, temperature=-1.0), "temperature"),
        (dict(length=4, top_p=0.0), "top_p"),
        (dict(length=4, per_step=2), "dynamic decoding only"),
        (dict(length=4, threshold=0.5), "dynamic decoding only"),
        (dict(length=4, dynamic=True, group_size=2), "do not apply to dynamic"),
        (dict(length=4, dynamic=True, order="random"), "do not apply to dynamic"),
        (dict(length=4, speculative=2, dynamic=True), "exclude each other"),
        (dict(length=4, speculative=2, group_size=2), "singleton groups"),
        (dict(length=4, speculative=-1), "speculative"),
        (dict(length=4, speculative=2, speculative_schedule="eager"), "unknown speculative_schedule"),
        (dict(length=4, speculative_schedule="heuristic"), "speculative decoding only"),
        (
            dict(length=4, order="random", order_generators=[torch.Generator()]),
            "one generator per row: got 1 for 2 rows",
        ),
    ],
)
def test_sample_errors(kwargs, message):
    model = tiny_a3_model("llama")
    with pytest.raises(ValueError, match=message):
        sample(model, PROMPTS, PROMPT_MASK, **kwargs)


def test_empty_prompt_errors():
    model = tiny_a3_model("llama")
    with pytest.raises(ValueError, match="empty prompt in row 1"):
        sample(model, PROMPTS, torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]), length=3)
    with pytest.raises(ValueError, match="no known token"):
        infill(model, PROMPTS, torch.zeros_like(PROMPTS, dtype=torch.bool))


def test_sample_text_prompt_that_fills_the_model():
    model, tok = tiny_a3_model("llama", max_position_embeddings=8), word_tokenizer(["a"])
    with pytest.raises(ValueError, match=r"the prompt \(9 tokens\) fills the model's 8 positions"):
        sample_text(model, tok, "a " * 8)


def test_parse_blanks():
    assert parse_blanks("The cat [BLANK:8] on the mat.") == ["The cat ", 8, " on the mat."]
    assert parse_blanks("[BLANK:2] a [BLANK:3]") == [2, " a ", 3]
    for bad, message in [
        ("The [BLANK:x] cat", "cannot parse blank spec '\\[BLANK:x\\]'"),
        ("The [BLANK] cat", "cannot parse blank spec"),
        ("The [BLANK:0] cat", "length >= 1"),
        ("no blanks here", "no blank"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_blanks(bad)


def test_encode_with_blanks_and_picture():
    tok = word_tokenizer(["the", "cat", "sat", "on", "mat", "."])
    ids, known = encode_with_blanks(tok, "the cat [BLANK:2] on the mat .")
    assert known.tolist() == [[True, True, True, False, False, True, True, True, True]]
    assert ids[0, :3].tolist() == [tok.bos_token_id, *tok.convert_tokens_to_ids(["the", "cat"])]
    bpe = tiny_bpe_tokenizer()
    for text in [
        "the cat sat.\n[BLANK:2] the mat.",
        "the cat\t\t[BLANK:2] the mat.",
        "the cat [BLANK:2] the mat.",
    ]:
        ids, known = encode_with_blanks(bpe, text)  # one space goes to the blank's first word, nothing else
        prefix = text.split("[BLANK")[0].removesuffix(" ")
        assert bpe.decode(ids[0][known[0]].tolist()[1:]) == prefix + " the mat."
    picture = render_fill_order(["a", "b", "c", "d"], [0, 2, 1, 0])
    assert picture.splitlines() == ["step 0: a _ _ d", "step 1: a _ [c] d", "step 2: a [b] c d"]
