"""Exact HMM conditionals against brute-force enumeration of every sequence of a tiny source."""

import itertools

import pytest
import torch

from a3lm import groups
from a3lm.data.synthetic import HMM
from a3lm.demo.exact import (
    conditional_logprobs,
    factorization_logprob,
    joint_logprob,
    marginal_logprob,
    posterior_word_logprobs,
    true_nll,
)

S, W, L = 3, 4, 4


def tiny_hmm(seed: int, sparse: bool = False) -> HMM:
    g = torch.Generator().manual_seed(seed)
    start, trans, emit = (
        torch.rand(*shape, generator=g, dtype=torch.float64) + 0.05 for shape in ((S,), (S, S), (S, W))
    )
    if sparse:  # zeros in every table: impossible words, transitions and sequences
        start[1] = 0.0
        trans[0, 0] = trans[2, 1] = 0.0
        emit[1, 3] = emit[2, 3] = emit[0, 1] = (
            0.0  # only state 0 says w3, and it never repeats: "w3 w3" is impossible
        )
    norm = lambda a: a / a.sum(-1, keepdim=True)  # noqa: E731
    return HMM(
        norm(start),
        norm(trans),
        norm(emit),
        words=[f"w{i}" for i in range(W)],
        states=[f"s{i}" for i in range(S)],
    )


def brute_joint(hmm: HMM) -> torch.Tensor:
    """p(x) for every word sequence: [W] * L, summing over every hidden path."""
    P = torch.zeros((W,) * L, dtype=torch.float64)
    for z in itertools.product(range(S), repeat=L):
        pz = hmm.start[z[0]] * torch.prod(torch.stack([hmm.trans[z[t], z[t + 1]] for t in range(L - 1)]))
        pxz = hmm.emit[z[0]]
        for t in range(1, L):  # outer product over positions: p(x | z)
            pxz = pxz[..., None] * hmm.emit[z[t]]
        P += pz * pxz
    return P


def brute_conditional(P: torch.Tensor, x: list[int], i: int, observed: list[int]) -> float:
    """log p(x_i | x_observed) by summing the joint table."""
    index = [slice(None)] * L
    for j in observed:
        index[j] = x[j]
    evidence = P[tuple(index)]
    index[i] = x[i]
    return float(torch.log(P[tuple(index)].sum() / evidence.sum()))


def all_sequences() -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(W), repeat=L)))


def groupings(gen: torch.Generator) -> list[torch.Tensor]:
    """Word-level group ids [1, L] of many shapes, as the A3 builders make them over [BOS w1..wL]."""
    row = torch.ones(1, L + 1, dtype=torch.long)
    known = torch.tensor([[True, True, False, False, True]])  # BOS, w1 and w4 known: infill w2, w3
    full = [
        groups.left_to_right(row),
        groups.right_to_left(row),
        groups.contiguous(row, 2),
        groups.contiguous(row, 4),
        groups.infill_groups(known, size=1),
        groups.infill_groups(known, size=2),
    ]
    full += [groups.random_order(row, size, gen) for size in (1, 1, 2, 2, 3) for _ in range(2)]
    out = [g[:, 1:] for g in full]  # drop BOS: it is the earliest group and carries no information
    out.append(torch.tensor([[5, 5, 2, 9]]))  # arbitrary ids: ties are one group, order by value only
    out.append(torch.tensor([[0, 0, 0, 0]]))  # one group: every token is its marginal
    return out


@pytest.mark.parametrize("sparse", [False, True])
def test_joint_matches_brute_force(sparse):
    hmm = tiny_hmm(0, sparse)
    P = brute_joint(hmm)
    assert torch.allclose(P.sum(), torch.ones((), dtype=torch.float64))
    x = all_sequences()
    got = joint_logprob(hmm, x).exp()
    want = P[tuple(x.T)]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-15)
    if sparse:  # the zeros really make some sequences impossible, and they come out as -inf
        assert (want == 0).any() and torch.isneginf(joint_logprob(hmm, x[want == 0])).all()


@pytest.mark.parametrize("sparse", [False, True])
def test_every_conditional_matches_brute_force(sparse):
    hmm = tiny_hmm(1, sparse)
    P = brute_joint(hmm)
    gen = torch.Generator().manual_seed(0)
    seqs = all_sequences()
    seqs = seqs[P[tuple(seqs.T)] > 0]  # conditionals are only defined on sequences the source can make
    seqs = seqs[torch.randperm(len(seqs), generator=gen)[:12]]
    for gids in groupings(gen):
        gids = gids.expand(len(seqs), -1)
        got = conditional_logprobs(hmm, seqs, gids, chunk=7)  # a chunk that does not divide B*L
        for b, x in enumerate(seqs.tolist()):
            for i in range(L):
                observed = [j for j in range(L) if gids[b, j] < gids[b, i]]
                want = brute_conditional(P, x, i, observed)
                assert abs(float(got[b, i]) - want) < 1e-9, (gids[b].tolist(), x, i, float(got[b, i]), want)


def test_singletons_in_any_order_chain_to_the_joint():
    hmm = tiny_hmm(2)
    x = all_sequences()
    gen = torch.Generator().manual_seed(1)
    joint = joint_logprob(hmm, x)
    for _ in range(5):
        perm_ids = torch.stack(
            [torch.randperm(L, generator=gen) for _ in range(len(x))]
        )  # an order per sample
        assert torch.allclose(factorization_logprob(hmm, x, perm_ids), joint, atol=1e-10)


def test_groups_lose_exactly_their_mutual_information():
    """Averaged over the source, a product of marginals is worse than the chain rule (KL > 0), and the
    one-group factorization is the sum of the per-position entropies."""
    hmm = tiny_hmm(3)
    P = brute_joint(hmm)
    x = all_sequences()
    px = P[tuple(x.T)]
    entropy = float(-(px * px.log()).sum())
    pairs = torch.tensor([[0, 0, 1, 1]]).expand(len(x), -1)
    grouped = float(-(px * factorization_logprob(hmm, x, pairs)).sum())
    assert grouped > entropy + 1e-6
    one = torch.zeros_like(x)
    marg_entropy = 0.0
    for i in range(L):
        m = P.sum(dim=tuple(j for j in range(L) if j != i))
        marg_entropy -= float((m * m.log()).sum())
    assert abs(float(-(px * factorization_logprob(hmm, x, one)).sum()) - marg_entropy) < 1e-9


def test_posterior_word_distributions_normalise_and_leave_own_word_out():
    hmm = tiny_hmm(4, sparse=True)
    x = torch.tensor([[0, 1, 2, 1]])
    observed = torch.tensor([[True, False, True, True]])
    logp = posterior_word_logprobs(hmm, x, observed)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(1, L, dtype=torch.float64))
    # position 2 is observed, but its own row must not depend on its own word
    other = x.clone()
    other[0, 2] = 3
    assert torch.allclose(posterior_word_logprobs(hmm, other, observed)[0, 2], logp[0, 2])


def test_true_nll_averages_the_targets_only():
    hmm = tiny_hmm(5)
    x = all_sequences()[:10]
    gids = torch.arange(L).expand(10, -1)
    mask = torch.zeros(10, L, dtype=torch.bool)
    mask[:, 2:] = True
    res = true_nll(hmm, x, gids, mask)
    want = -conditional_logprobs(hmm, x, gids)[:, 2:].mean()
    assert res.count == 20 and abs(res.nll - float(want)) < 1e-12


def test_bad_input_is_a_clear_error():
    hmm = tiny_hmm(0)
    with pytest.raises(ValueError, match="word indices"):
        joint_logprob(hmm, torch.tensor([[0, W]]))
    with pytest.raises(ValueError, match="differ in shape"):
        conditional_logprobs(
            hmm, torch.zeros(2, L, dtype=torch.long), torch.zeros(2, L - 1, dtype=torch.long)
        )


def test_marginal_of_observed_positions_matches_brute_force():
    hmm = tiny_hmm(6, sparse=True)
    P = brute_joint(hmm)
    x = torch.tensor([[0, 1, 2, 3], [3, 2, 0, 0]])
    observed = torch.tensor([[True, False, False, True], [False, True, True, False]])
    got = marginal_logprob(hmm, x, observed)
    for b in range(2):
        index = tuple(int(x[b, j]) if observed[b, j] else slice(None) for j in range(L))
        assert abs(float(got[b].exp()) - float(P[index].sum())) < 1e-12
    # infilling: log p(blanks | known) = joint - marginal(known), and everything observed is the joint
    assert torch.allclose(marginal_logprob(hmm, x, torch.ones_like(observed)), joint_logprob(hmm, x))
