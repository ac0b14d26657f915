"""What runs beside the training loop: logging, progress, evaluations, tests' fault injection.

    Trainer(cfg, callbacks=[MyCallback()]).fit()

A callback overrides the hooks it needs; the trainer calls each hook of every callback in list order
(its own metrics log and progress bar first), on every rank: a callback that writes files checks
`trainer.dist.main`. Hooks see the trainer itself (`trainer.step`, `trainer.model`, `trainer.cfg`)
and may raise. SIGINT/SIGTERM raised in `on_step_end` stop the run after that step, with a checkpoint,
as a Ctrl-C during the step does (tests inject interruptions this way).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from a3lm.training.trainer import Trainer


class Callback:
    """No-op hooks, in the order a run meets them."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """The loop is about to run (not called for a run that is already finished)."""

    def on_phase_start(self, trainer: Trainer) -> None:
        """`trainer.phase` begins at `trainer.step` (its model, optimizer and schedule are fresh)."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Optimizer step `trainer.step` is done; `metrics` as logged (loss, lr, tokens_per_s, ...).
        Runs before that step's checkpoint, if one is due."""

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """Checkpoint `path` (of `trainer.step`) is complete on disk."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """The loop ended, by finishing, stopping or raising: release what on_fit_start took."""
