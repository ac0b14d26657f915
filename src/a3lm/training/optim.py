"""The optimizer and its LR schedule, one pair per training phase, each with a checkpointable state.

AdamW with linear warmup then cosine / linear decay to `min_lr_ratio * lr` over the phase (stage 0;
stages 1-3), or restarted at every curriculum stage with `OptimConfig.stage_schedule`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from a3lm.training.config import OptimConfig
from a3lm.training.curriculum import CurriculumConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and the query vector (1-D parameters), as is usual."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at phase-local step `step` of `total`: warmup, then decay."""
    warmup = min(cfg.warmup_steps, max(total - 1, 0))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.decay == "constant" or total <= warmup + 1:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup - 1))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


class Schedule:
    """LambdaLR-like: a stateful step counter setting the optimizer's LRs (state_dict is picklable).

    `segments` (default: one of `total` steps) are consecutive stretches that each run their own
    warmup and decay (`OptimConfig.stage_schedule`: one per curriculum stage).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        peak_lr: float,
        total: int,
        cfg: OptimConfig,
        segments: list[int] | None = None,
    ):
        self.optimizer, self.peak_lr, self.total, self.cfg, self.step_count = (
            optimizer,
            peak_lr,
            total,
            cfg,
            0,
        )
        self.segments = segments or [total]
        if sum(self.segments) != total:
            raise ValueError(f"schedule segments {self.segments} do not add up to the phase's {total} steps")
        self._apply()

    def lr(self) -> float:
        step = self.step_count
        for length in self.segments[:-1]:
            if step < length:
                break
            step -= length
        else:
            length = self.segments[-1]
        return self.peak_lr * lr_factor(step, length, self.cfg)

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr()

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "peak_lr": self.peak_lr, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.peak_lr, self.total = state["step_count"], state["peak_lr"], state["total"]
        self._apply()


def for_phase(
    model: nn.Module, cfg: OptimConfig, curriculum: CurriculumConfig, kind: str, start: int, end: int
) -> tuple[torch.optim.Optimizer, Schedule]:
    """A fresh optimizer and schedule for steps [start, end) of a phase of `kind` ("ar": stage 0's LR)."""
    lr = cfg.stage0_lr if kind == "ar" else cfg.lr
    optimizer = build_optimizer(model, cfg, lr)
    segments = None
    if cfg.stage_schedule:
        segments = [e - b for _, b, e in curriculum.spans() if start <= b < end]
    return optimizer, Schedule(optimizer, lr, end - start, cfg, segments)


class OptimizerState:
    """AdamW's moments keyed by parameter name (not by position), so they reshard with the model."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=self._options())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=self._options())
