"""Speculative decoding: exact samples of the singleton order's joint, greedy = s = 1, cache = recompute."""

import itertools

import pytest
import torch

from a3lm.decoding.api import infill, sample
from a3lm.decoding.tokens import filter_logits
from a3lm.model.debug import tiny_a3_model
from a3lm.model.families import sliding_window

PROMPTS = torch.tensor([[0, 0, 1, 7, 9], [1, 4, 5, 6, 8]])  # left-padded
PROMPT_MASK = (PROMPTS != 0).long()


def _sharp_model(family: str, scale: float = 16, **kwargs):
    model = tiny_a3_model(family, **kwargs)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def _p_value(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expecting < 5 are pooled."""
    n = observed.sum()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = torch.tensor((int(keep.sum()) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


@torch.no_grad()
def _joint(model, every, group_ids, temperature, top_k) -> torch.Tensor:
    """probs [S] of every sequence under the factorization group_ids, each conditional filtered alike."""
    logits = model(input_ids=every, group_ids=group_ids.expand(len(every), -1)).logits[:, 1:]
    logp = (
        filter_logits(logits, temperature, top_k).log_softmax(-1).gather(-1, every[:, 1:, None]).squeeze(-1)
    )
    return logp.sum(1).exp()


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 3)])
def test_samples_follow_the_singleton_order_joint(temperature, top_k):
    """Chi-square of many speculative samples (order: position 3, then 1, then 2; k = 3) against the
    exact joint of the singleton order; the same test rejects the product of marginals (s = 3)."""
    model = _sharp_model("llama", vocab_size=4)
    n, length, V = 3000, 3, 4  # the two distributions are 0.3 apart in total variation: n = 3000 is plenty
    out = sample(
        model,
        torch.ones(n, 1, dtype=torch.long),
        length=length,
        order=torch.tensor([2, 0, 1]),
        speculative=3,
        temperature=temperature,
        top_k=top_k,
        stop_at_eos=False,
        seed=0,
    )
    singleton = torch.tensor([[0, 2, 3, 1]])
    assert bool((out.group_ids == singleton).all())
    assert 0 < out.accepted < out.drafted  # it speculated, and it rejected some drafts
    every = torch.tensor([[1, *c] for c in itertools.product(range(V), repeat=length)])
    code = (out.sequences[:, 1:] * torch.tensor([V * V, V, 1])).sum(1)
    observed = torch.bincount(code, minlength=V**length).double()
    exact = _joint(model, every, singleton, temperature, top_k)
    torch.testing.assert_close(exact.sum(), torch.tensor(1.0))
    assert _p_value(observed, exact) > 1e-3
    marginals = _joint(model, every, torch.tensor([[0, 1, 1, 1]]), temperature, top_k)
    assert _p_value(observed, marginals) < 1e-6


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("order", ["left-to-right", "random", "per-row"])
def test_greedy_equals_one_token_steps(core_family, order, k):
    model = _sharp_model(core_family)
    if order == "per-row":
        order = [torch.tensor([5, 0, 3, 1, 4, 2]), torch.tensor([2, 3, 4, 5, 0, 1])]
    kw = dict(length=6, order=order, temperature=0, seed=4, stop_at_eos=False)
    plain = sample(model, PROMPTS, PROMPT_MASK, **kw)
    spec = sample(model, PROMPTS, PROMPT_MASK, speculative=k, **kw)
    assert torch.equal(spec.sequences, plain.sequences)
    assert torch.equal(spec.group_ids, plain.group_ids)  # the singleton order's factorization
    # greedy drafts of this model are mostly right; with the debug window (4 tokens) a draft's context
    # is cut short, so the windowed families' speed-up is not assured (their exactness above is)
    if sliding_window(model.config.text_config) is None:
        assert spec.num_steps < plain.num_steps


def test_greedy_infill_equals_one_token_steps():
    model = _sharp_model("llama")
    ids = torch.tensor([[1, 5, 6, 0, 0, 0, 9, 10, 0, 11], [1, 0, 0, 7, 8, 0, 0, 0, 0, 0]])
    known = torch.tensor([[1, 1, 1, 0, 0, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 0, 0, 0, 0, 0]]).bool()
    mask = torch.tensor([[1] * 10, [1] * 7 + [0] * 3])
    plain = infill(model, ids, known, mask, order="random", temperature=0, seed=1)
    spec = infill(model, ids, known, mask, order="random", temperature=0, seed=1, speculative=3)
    assert torch.equal(spec.sequences, plain.sequences) and torch.equal(spec.group_ids, plain.group_ids)
    assert torch.equal(spec.sequences[known], ids[known])


@pytest.mark.parametrize(
    "order, schedule", [("left-to-right", "constant"), ("random", "constant"), ("random", "heuristic")]
)
def test_cached_verification_equals_recompute(order, schedule):
    """Same seed, same draws: drafts, acceptances and residual draws agree with the full forward."""
    model = _sharp_model("qwen2", scale=4)  # broad enough for rejections
    kw = dict(
        length=12,
        order=order,
        speculative=3,
        speculative_schedule=schedule,
        temperature=0.8,
        top_p=0.95,
        seed=0,
        output_logits=True,
    )
    runs = [sample(model, PROMPTS, PROMPT_MASK, use_cache=c, stop_at_eos=False, **kw) for c in (True, False)]
    a, b = runs
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.fill_step, b.fill_step)
    assert (a.num_steps, a.drafted, a.accepted) == (b.num_steps, b.drafted, b.accepted)
    assert a.accepted < a.drafted  # some rejections happened, so the cache dropped drafts
    for x, y in zip(a.step_logits, b.step_logits, strict=True):
        assert torch.equal(x.positions_BQ, y.positions_BQ)
        valid = x.positions_BQ >= 0
        torch.testing.assert_close(x.logits_BQV[valid], y.logits_BQV[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", ["left-to-right", "random"])
def test_heuristic_window_follows_acceptance(order):
    """Greedy drafts of a sharp model are mostly right: the heuristic window grows past k = 2, so it needs
    fewer forwards than a constant k = 2, for the same tokens (greedy s = 1's)."""
    model = _sharp_model("llama")
    kw = dict(length=16, order=order, temperature=0, seed=2, stop_at_eos=False)
    plain = sample(model, PROMPTS[1:], **kw)
    constant = sample(model, PROMPTS[1:], speculative=2, **kw)
    heuristic = sample(model, PROMPTS[1:], speculative=2, speculative_schedule="heuristic", **kw)
    assert torch.equal(heuristic.sequences, plain.sequences) and torch.equal(
        heuristic.group_ids, plain.group_ids
    )
    assert heuristic.num_steps < constant.num_steps
    assert heuristic.drafted > constant.drafted  # wider windows
