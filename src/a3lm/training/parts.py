"""The trainer's stateful parts that are not the optimizer's: weights, data position, RNG streams.

Each has `state_dict` / `load_state_dict` and registers with the run's `checkpoint.CheckpointManager`;
per-rank parts also say how to continue on another number of processes (`load_resharded`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from a3lm.data.loader import PackedLoader
from a3lm.training.curriculum import rank_generator


def seed_everything(seed: int) -> None:
    """The global RNGs (Python, NumPy, torch): the tiny model's init and the query vector draw from them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(group_gen: torch.Generator) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "groups": group_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, group_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    group_gen.set_state(state["groups"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ModelState:
    """The model's weights keyed by parameter name: DTensor shards under FSDP, whole tensors otherwise.

    trainable_only (LoRA): only what trains (adapters, query vector); the frozen rest is rebuilt from
    the run's model, not saved.
    """

    def __init__(self, model: nn.Module, trainable_only: bool = False):
        self.model, self.trainable_only = model, trainable_only

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.trainable_only, strict=not self.trainable_only)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.model, options=self._options())
        if self.trainable_only:  # DCP drops frozen parameters by their first name only: a tied lm_head stays
            frozen = self._frozen()
            state = {k: v for k, v in state.items() if k not in frozen}
        return state

    def _frozen(self) -> set[str]:
        named = self.model.named_parameters(remove_duplicate=False)  # tied names (lm_head) too
        return {n for n, p in named if not p.requires_grad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        result = set_model_state_dict(self.model, state, options=self._options())
        if self.trainable_only:  # not strict: the frozen weights are missing by design, nothing else may be
            frozen = self._frozen()
            missing = [k for k in result.missing_keys if k not in frozen]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"checkpoint does not match the adapted model: missing {missing[:4]}, "
                    f"unexpected {list(result.unexpected_keys)[:4]}"
                )


class DataPosition:
    """This rank's data position; on another world size, the position of every old rank (see data.py)."""

    def __init__(self, loader: PackedLoader):
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        self.loader.load_resharded(states)


class RNGState:
    """The global RNGs and this rank's grouping stream (`groups`, drawn from (seed, rank)).

    On another world size, the global RNGs (the same on every rank: they drive the model init) come
    from old rank 0, and each rank's grouping stream is drawn afresh from (seed, rank, step): stage 3's
    groupings then differ from the uninterrupted run's (the same distribution, other draws).
    """

    def __init__(self, seed: int, rank: int, world_size: int, step: Callable[[], int]):
        self.seed, self.rank, self.world_size, self.step = seed, rank, world_size, step
        self.groups = rank_generator(seed, rank)

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.groups)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state, self.groups)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        set_rng_state(states[0], self.groups)
        self.groups = rank_generator(self.seed, self.rank, salt=(self.world_size, self.step()))
