"""Where a run's numbers go: metrics.jsonl (+ wandb / tensorboard when asked) and the progress bar.

Both are callbacks of the trainer; the metrics log is also a checkpointed part: its state is the
step the file is valid through, so a resumed run drops the lines logged after its checkpoint (the
steps that follow are trained, and logged, again).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from a3lm.files import atomic_write, read_jsonl
from a3lm.training.callbacks import Callback
from a3lm.training.config import LogConfig, TrainConfig
from a3lm.training.curriculum import describe, policy_at
from a3lm.training.run_folder import wandb_run_id

if TYPE_CHECKING:
    from a3lm.training.trainer import Trainer


class MetricsLog(Callback):
    """One JSON line per logged step (every `log.every` steps and the last), written by rank 0."""

    def __init__(self, path: Path, cfg: TrainConfig, main: bool, through: int = 0):
        self.path, self.cfg, self.main, self.through = Path(path), cfg, main, through
        self._file: Any = None
        self._backends: list[Callable[[dict[str, Any]], Any]] = []
        self._closers: list[Callable[[], Any]] = []

    @property
    def log(self) -> LogConfig:
        return self.cfg.log

    # -- checkpointed state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"through": self.through}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.through = state["through"]

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        self.load_state_dict(states[0])  # the same step on every rank

    # -- hooks --------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer) -> None:
        if not self.main:
            return
        self._truncate()
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in on_fit_end)
        if self.log.wandb:
            self._open_wandb()
        if self.log.tensorboard:
            self._open_tensorboard()

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.through = trainer.step
        if self._file is not None and (
            trainer.step % self.log.every == 0 or trainer.step == trainer.total_steps
        ):
            self._file.write(json.dumps(metrics) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())  # a kill leaves at most a torn last line (dropped on resume)
            for backend in self._backends:
                backend(metrics)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for close in self._closers:
            close()
        self._backends, self._closers = [], []

    # -- parts --------------------------------------------------------------------------------------

    def _truncate(self) -> None:
        """Drop lines logged after `through` (a resumed run logs those steps again) and a torn last line."""
        if self.path.exists():
            kept = [m for m in read_jsonl(self.path) if m.get("step", 0) <= self.through]
            atomic_write(self.path, "".join(json.dumps(m) + "\n" for m in kept))

    def _open_wandb(self) -> None:
        import wandb  # only when asked for

        out = self.path.parent
        run = wandb.init(
            project=self.log.project,
            config=asdict(self.cfg),
            dir=str(out),
            id=wandb_run_id(out),
            resume="allow",
        )
        self._backends.append(lambda m: run.log(m, step=m["step"]))
        self._closers.append(run.finish)

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # only when asked for

        writer = SummaryWriter(str(self.path.parent / "tensorboard"))
        self._backends.append(
            lambda m: [
                writer.add_scalar(k, v, m["step"])
                for k, v in m.items()
                if isinstance(v, int | float) and k != "step"
            ]
        )
        self._closers.append(writer.close)


class ProgressBar(Callback):
    """A tqdm bar over the run's steps: the stage and group size, the loss and tokens/s."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_description(describe(policy_at(trainer.cfg.curriculum, trainer.step - 1)))
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
