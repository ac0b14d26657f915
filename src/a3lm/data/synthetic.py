"""The embedded synthetic corpus: a seeded hidden Markov model over a small English vocabulary.

Every probability of the source is known exactly (`HMM.start`, `HMM.trans`, `HMM.emit`, float64), so
a model trained on it can be compared with the true conditionals (forward-backward, `a3lm.exact`, which
also gives a document's exact log-likelihood), for any order.

Hidden states are parts of speech with a toy grammar (DET ADJ* NOUN VERB ...); each state emits only
its own handful of words (sparse emissions) and moves to a few allowed successors (sparse
transitions), with Dirichlet-drawn weights so that the probabilities are uneven but learnable by a
tiny model on CPU in minutes. Two words ("light", "watch") are emitted by two states each, so the
hidden state is not always a function of the word. A document is `length` consecutive emissions:
fixed length, no end-of-sentence event (the chain simply continues through "." and "and").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# state -> the words it emits (order fixes word indices; a word listed twice keeps its first index)
GRAMMAR_WORDS: dict[str, tuple[str, ...]] = {
    "DET": ("the", "a", "every", "some", "this"),
    "ADJ": ("small", "big", "red", "old", "happy", "light"),
    "NOUN": ("cat", "dog", "bird", "child", "farmer", "river", "house", "tree", "light", "watch"),
    "PRON": ("she", "he", "it"),
    "VERB": ("sees", "likes", "finds", "follows", "carries", "watch"),
    "IVERB": ("sleeps", "runs", "sings", "waits"),
    "PREP": ("near", "under", "behind", "with"),
    "ADV": ("slowly", "today", "often", "again"),
    "CONJ": ("and", "but"),
    "PUNCT": (".",),
}

# state -> allowed successor states (sparse transitions)
GRAMMAR_NEXT: dict[str, tuple[str, ...]] = {
    "DET": ("ADJ", "NOUN"),
    "ADJ": ("ADJ", "NOUN"),
    "NOUN": ("VERB", "IVERB", "PREP", "CONJ", "PUNCT"),
    "PRON": ("VERB", "IVERB"),
    "VERB": ("DET", "PRON"),
    "IVERB": ("ADV", "PREP", "CONJ", "PUNCT"),
    "PREP": ("DET",),
    "ADV": ("PUNCT", "CONJ", "PREP"),
    "CONJ": ("DET", "PRON"),
    "PUNCT": ("DET", "PRON"),
}
GRAMMAR_START: tuple[str, ...] = ("DET", "PRON")


@dataclass
class HMM:
    """A hidden Markov model; rows of `trans` and `emit` and `start` sum to 1 (float64).

    start [S]: p(z_1 = s); trans [S, S]: p(z_{t+1} = j | z_t = i); emit [S, W]: p(x_t = w | z_t = s).
    words[w] is the text of word index w; states[s] names state s.
    """

    start: torch.Tensor
    trans: torch.Tensor
    emit: torch.Tensor
    words: list[str]
    states: list[str]

    def __post_init__(self) -> None:
        S, W = self.emit.shape
        if (
            self.start.shape != (S,)
            or self.trans.shape != (S, S)
            or len(self.words) != W
            or len(self.states) != S
        ):
            raise ValueError(
                f"inconsistent HMM shapes: start {tuple(self.start.shape)}, trans {tuple(self.trans.shape)}, "
                f"emit {tuple(self.emit.shape)}, {len(self.words)} words, {len(self.states)} states"
            )
        for name, t in (("start", self.start), ("trans", self.trans), ("emit", self.emit)):
            if (
                t.dtype != torch.float64
                or (t < 0).any()
                or not torch.allclose(t.sum(-1), torch.ones((), dtype=t.dtype))
            ):
                raise ValueError(f"HMM.{name} must be float64 probabilities summing to 1 along the last axis")

    @property
    def num_states(self) -> int:
        return self.emit.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.emit.shape[1]


def default_hmm(seed: int = 0, concentration: float = 1.5) -> HMM:
    """The built-in grammar HMM (10 states, 43 words) with Dirichlet(concentration) weights drawn
    from `seed`."""
    rng = np.random.default_rng(seed)
    states = list(GRAMMAR_WORDS)
    words: list[str] = []
    for ws in GRAMMAR_WORDS.values():
        words.extend(w for w in ws if w not in words)
    S, W = len(states), len(words)

    def sparse_row(allowed: Sequence[int], size: int) -> np.ndarray:
        row = np.zeros(size)
        row[list(allowed)] = rng.dirichlet(np.full(len(allowed), concentration))
        return row

    start = sparse_row([states.index(s) for s in GRAMMAR_START], S)
    trans = np.stack([sparse_row([states.index(n) for n in GRAMMAR_NEXT[s]], S) for s in states])
    emit = np.stack([sparse_row([words.index(w) for w in GRAMMAR_WORDS[s]], W) for s in states])
    as_t = lambda a: torch.from_numpy(a / a.sum(-1, keepdims=True))  # noqa: E731  (exact renormalisation)
    return HMM(start=as_t(start), trans=as_t(trans), emit=as_t(emit), words=words, states=states)


def sample_documents(
    hmm: HMM, n_docs: int, length: int, generator: torch.Generator | None = None, return_states: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """n_docs documents of `length` word indices: LongTensor [n_docs, length] (and the hidden states).

    Deterministic given the generator's state (CPU torch.multinomial on the float64 tables).
    """
    if n_docs < 0 or length < 1:
        raise ValueError(f"need n_docs >= 0 and length >= 1, got n_docs={n_docs}, length={length}")
    words = torch.empty(n_docs, length, dtype=torch.long)
    states = torch.empty(n_docs, length, dtype=torch.long)
    if n_docs == 0:
        return (words, states) if return_states else words
    z = torch.multinomial(hmm.start.expand(n_docs, -1), 1, generator=generator).squeeze(-1)
    for t in range(length):
        states[:, t] = z
        words[:, t] = torch.multinomial(hmm.emit[z], 1, generator=generator).squeeze(-1)
        if t + 1 < length:
            z = torch.multinomial(hmm.trans[z], 1, generator=generator).squeeze(-1)
    return (words, states) if return_states else words


def texts(hmm: HMM, word_ids: torch.Tensor) -> list[str]:
    """Space-joined words of each row of word indices [n_docs, length]."""
    return [" ".join(hmm.words[i] for i in row) for row in word_ids.tolist()]


class SyntheticCorpus:
    """An endless, seekable stream of HMM documents: document i depends only on (seed, i).

    Documents are drawn in blocks of `block_size` from a generator seeded by (seed, block), so any
    document can be regenerated without replaying the stream (resume, per-rank sharding).
    """

    def __init__(self, hmm: HMM, length: int = 16, seed: int = 0, block_size: int = 256):
        self.hmm, self.length, self.seed, self.block_size = hmm, length, seed, block_size
        self._cache: tuple[int, torch.Tensor] | None = None

    def block(self, b: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != b:
            seed = int(np.random.SeedSequence([self.seed, b]).generate_state(1, dtype=np.uint64)[0] >> 1)
            gen = torch.Generator().manual_seed(seed)
            self._cache = (b, sample_documents(self.hmm, self.block_size, self.length, gen))
        return self._cache[1]

    def __getitem__(self, i: int) -> torch.Tensor:
        """Word indices [length] of document i."""
        if i < 0:
            raise IndexError("the synthetic corpus is endless: negative indices have no meaning")
        return self.block(i // self.block_size)[i % self.block_size]
