"""The training loop of one rank, put together from its parts.

    Trainer(cfg, callbacks=[...]).fit() -> Path of run/final (or of the `stop_after` checkpoint)

Parts, each owning its state and registered with one `checkpoint.CheckpointManager`: the model
(`parts.ModelState`), optimizer and LR schedule (`optim`, fresh at every phase), data position and RNG
streams (`parts`, per rank) and the metrics log (`metrics.MetricsLog`, per rank). Processes and
devices come from `distributed`, the first model and tokenizer from `build`. Everything beside the
loop (logging, the progress bar, a demo's evaluations) is a `callbacks.Callback`.

Phases: stage 0 trains the base `*ForCausalLM` with its next-token loss; stages 1-3 train the A3
model built from it, with a fresh optimizer and LR schedule, since pretraining and curriculum
fine-tuning want different learning rates. Steps are global across phases, so `step` alone locates
a run; the curriculum decides the grouping of every step.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from a3lm.data.loader import PackedLoader, build_loader
from a3lm.model.modeling import A3ForCausalLM, max_positions
from a3lm.training import build, lora, optim
from a3lm.training import checkpoint as ckpt
from a3lm.training.callbacks import Callback
from a3lm.training.config import TrainConfig
from a3lm.training.curriculum import CurriculumConfig, policy_at
from a3lm.training.distributed import (
    autocast_dtype,
    device_kind,
    full_state_dict,
    init_distributed,
    pick_device,
    wrap,
)
from a3lm.training.metrics import MetricsLog, ProgressBar
from a3lm.training.outputs import RunSaving
from a3lm.training.parts import DataPosition, ModelState, RNGState, seed_everything
from a3lm.training.run_folder import (
    AR_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FINAL_DIR,
    METRICS_FILE,
    RunLock,
    check_run_folder,
    discard_run,
)
from a3lm.training.step import GradientStep


@dataclass
class Phase:
    """A stretch of steps trained on one model kind with one optimizer and LR schedule."""

    kind: str  # "ar" (stage 0, the base model) | "a3" (stages 1-3)
    start: int
    end: int


def phases(cur: CurriculumConfig) -> list[Phase]:
    out: list[Phase] = []
    for stage, start, end in cur.spans():
        kind = "ar" if stage == 0 else "a3"
        if out and out[-1].kind == kind:
            out[-1].end = end
        else:
            out.append(Phase(kind, start, end))
    return out


@contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT/SIGTERM ask for a checkpoint at the end of the current step; a second one kills."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        trainer.stop_requested = True
        signal.signal(signum, previous[signum])  # a second signal takes the default path

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Trainer(RunSaving):
    """Owns the model, optimizer, data and RNG of one rank; `fit()` runs the curriculum to its end.

    callbacks: run after the trainer's own metrics log and progress bar, in order (`callbacks.Callback`).
    """

    def __init__(self, cfg: TrainConfig, callbacks: Sequence[Callback] = ()):
        cfg.validate()
        cfg = cfg.seeded()  # recorded so in config.json: the seeds the run actually used
        self.cfg, self.out = cfg, Path(cfg.output)
        self.dist = init_distributed(device_kind(cfg.device))
        self.device = pick_device(cfg.device, self.dist)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        lora.check_4bit(cfg.lora)
        # read-only checks first: nothing is written until the model and the data are known to load
        check_run_folder(self.out, cfg, write=False)
        # one process trains in a folder at a time (the lock file is all a failed start leaves, and
        # it is removed then)
        self.lock = RunLock(self.out) if self.dist.main else None
        try:
            self._setup(cfg, callbacks)
        except BaseException:
            if self.lock is not None:
                self.lock.release(clean=True)
            raise

    def _setup(self, cfg: TrainConfig, callbacks: Sequence[Callback]) -> None:
        build.check_sources(cfg)
        self.phases = phases(cfg.curriculum)
        self.total_steps = cfg.curriculum.total_steps
        self.tokenizer = build.load_tokenizer(cfg)
        seed_everything(cfg.seed)  # before any model is built: its init draws from the global RNG
        self.step, self.tokens_seen = 0, 0
        self.stop_requested = False
        self.model: nn.Module | None = None
        self.ddp_model: nn.Module | None = None
        self.phase: Phase | None = None
        self.ckpt_root = self.out / CHECKPOINTS_DIR
        self.checkpoints = ckpt.CheckpointManager(
            self.ckpt_root, cfg.checkpoint.keep, self.dist.rank, self.dist.world_size, self.dist.barrier
        )
        self.rng = RNGState(cfg.curriculum.seed, self.dist.rank, self.dist.world_size, lambda: self.step)
        latest = self.checkpoints.latest()
        self._enter_phase(*(self._resume_skeleton(latest) if latest is not None else self._first_phase()))
        self.loader = self._build_loader()
        self.metrics = MetricsLog(self.out / METRICS_FILE, cfg, self.dist.main, through=self.step)
        self._register_per_rank_parts()
        if latest is not None:
            self.checkpoints.load(latest)
        self.callbacks: list[Callback] = [self.metrics, *self._own_callbacks(), *callbacks]
        self.new_run = not (self.out / CONFIG_FILE).exists()
        self.dist.barrier()  # every rank looks before rank 0 writes
        if self.dist.main:
            check_run_folder(self.out, cfg, write=True)
        self.dist.barrier()

    # -- setup ----------------------------------------------------------------------------------

    @property
    def fsdp(self) -> bool:
        return self.dist.enabled and self.cfg.parallel == "fsdp"

    @property
    def group_gen(self) -> torch.Generator:
        """This rank's grouping stream (stages 1-3 draw every sample's grouping from it)."""
        return self.rng.groups

    def _first_phase(self) -> tuple[Phase, nn.Module]:
        first = self.phases[0]
        return first, build.initial_model(self.cfg, first.kind, self.tokenizer)

    def _build_loader(self) -> PackedLoader:
        loader = build_loader(
            self.cfg.data,
            self.tokenizer,
            self.dist.rank,
            self.dist.world_size,
            max_positions=max_positions(self.model),
        )
        loader.check_readable()
        return loader

    def _register_per_rank_parts(self) -> None:
        self.checkpoints.register("data", DataPosition(self.loader), per_rank=True)
        self.checkpoints.register("rng", self.rng, per_rank=True)
        # checkpoints written before the metrics log had a state lack it: the resumed step stands in
        self.checkpoints.register("metrics", self.metrics, per_rank=True, optional=True)

    def _own_callbacks(self) -> list[Callback]:
        return [ProgressBar()] if self.dist.main and self.cfg.log.progress else []

    def phase_at(self, step: int) -> Phase:
        return next(p for p in self.phases if p.start <= step < p.end)

    def _enter_phase(self, phase: Phase, model: nn.Module) -> None:
        """Put `model` (already the phase's kind) on the device with a fresh optimizer and schedule."""
        self.phase = phase
        adapt = self.cfg.lora.enabled and phase.kind == "a3"
        if adapt:
            lora.add_adapters(model, self.cfg.lora)
        model.train().to(self.device)
        if self.cfg.model.gradient_checkpointing:
            build.enable_gradient_checkpointing(model)
        self.model = model
        self.ddp_model = wrap(model, self.dist, self.device, self.fsdp)
        self.optimizer, self.schedule = optim.for_phase(
            model, self.cfg.optim, self.cfg.curriculum, phase.kind, phase.start, phase.end
        )
        self.gradients = GradientStep(
            model,
            self.ddp_model,
            self.optimizer,
            self.dist,
            self.device,
            self.amp_dtype,
            self.fsdp,
            self.cfg.optim.grad_clip,
        )
        self.checkpoints.register("model", ModelState(model, trainable_only=adapt))
        self.checkpoints.register("optimizer", optim.OptimizerState(model, self.optimizer))
        self.checkpoints.register("schedule", self.schedule)

    def _next_phase(self) -> None:
        """Stage 0 -> 1: wrap the AR model as an A3 model (fresh query vector), new optimizer."""
        phase = self.phase_at(self.step)
        if not (phase.kind == "a3" and self.phase.kind == "ar"):
            raise RuntimeError(f"no transition from a {self.phase.kind} phase to a {phase.kind} phase")
        base = self.model
        if self.fsdp:  # gather the shards into a plain CPU copy of the base model
            base = build.base_copy(base, full_state_dict(self.model, True, all_ranks=True))
        self._enter_phase(phase, A3ForCausalLM.from_base(base.eval().cpu()))

    # -- one optimizer step ---------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches, loss weighted per target token globally."""
        policy = policy_at(self.cfg.curriculum, self.step)
        batches = [self.loader.next_batch() for _ in range(self.cfg.optim.grad_accum)]
        loss_sum, total = self.gradients.accumulate(batches, policy, self.group_gen, self.step)
        grad_norm = self.gradients.clipped_grad_norm(policy, self.step)
        lr = self.schedule.lr()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        real = torch.tensor(float(sum(int(b["attention_mask"].sum()) for b in batches)), device=self.device)
        tokens = int(self.dist.all_reduce(real))  # padding of instruction rows is not counted
        self.step += 1
        self.tokens_seen += tokens
        loss = float(self.dist.all_reduce(loss_sum) / total)
        return {
            "step": self.step,
            "stage": policy.stage,
            "group_size": policy.size,
            "order": policy.order,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            "step_tokens": tokens,
            "source_tokens": self._source_tokens(),
        }

    def _source_tokens(self) -> dict[str, int]:
        """Tokens of each data source put into rows so far, over every rank (BOS and padding not counted)."""
        counts = torch.tensor(self.loader.source_tokens, dtype=torch.long, device=self.device)
        counts = self.dist.all_reduce(counts)
        return dict(zip(self.loader.docs.names, counts.tolist(), strict=True))

    # -- the loop -------------------------------------------------------------------------------

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _should_stop(self) -> bool:
        flag = torch.tensor(float(self.stop_requested), device=self.device)
        return bool(self.dist.all_reduce(flag, dist.ReduceOp.MAX))

    def _finished(self) -> Path | None:
        """run/final of a finished run (written now if a kill came between the last checkpoint and
        it), the checkpoint of a reached `stop_after`; None while there are steps to train."""
        if self.step >= self.total_steps:
            self.dist.barrier()  # every rank looks before any rank writes
            if not (self.out / FINAL_DIR).exists():
                self._save_model_dir(FINAL_DIR)
            return self.out / FINAL_DIR
        if self.cfg.stop_after is not None and self.step >= self.cfg.stop_after:
            return ckpt.latest_checkpoint(self.ckpt_root)
        return None

    def _advance(self) -> Path | None:
        """One step, its callbacks and the saves due after it; the checkpoint where `stop_after` ends the
        run."""
        if self.step >= self.phase.end:
            self._next_phase()
        if self.step == self.phase.start:
            self._emit("on_phase_start")
        t0 = time.perf_counter()
        m = self.train_step()
        m["tokens_per_s"] = m.pop("step_tokens") / max(time.perf_counter() - t0, 1e-9)
        self._emit("on_step_end", m)
        stop = self._should_stop()
        at_stop = self.cfg.stop_after is not None and self.step >= self.cfg.stop_after
        if self.step == self.phase.end and self.phase.kind == "ar":
            self._save_model_dir(AR_DIR)  # before the checkpoint: a checkpoint past stage 0 implies it
        path = None
        if self.step % self.cfg.checkpoint.every == 0 or self.step == self.phase.end or stop or at_stop:
            path = self.save_checkpoint()
        if stop:
            raise KeyboardInterrupt(f"interrupted: checkpoint {path} saved; rerun the same command to resume")
        return path if at_stop and self.step < self.total_steps else None

    def fit(self) -> Path:
        """Train to the end of the curriculum (or `stop_after`); returns run/final (or the checkpoint).
        The run folder's lock is released when it returns or fails."""
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> Path:
        done = self._finished()
        if done is not None:
            return done
        self._emit("on_fit_start")
        try:
            with _stop_on_signals(self):
                while self.step < self.total_steps:
                    stopped_at = self._advance()
                    if stopped_at is not None:
                        return stopped_at
            self._save_model_dir(FINAL_DIR)
            return self.out / FINAL_DIR
        finally:
            self._emit("on_fit_end")

    def discard_if_nothing_saved(self) -> None:
        """After a failure: a run this process started that never reached a checkpoint leaves no
        folder behind (a corrected rerun then starts afresh, whatever it changed)."""
        if self.dist.main and self.new_run and self.checkpoints.latest() is None:
            discard_run(self.out)
