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
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from a3lm.data.loader import PackedLoader, build_loader
from a3lm.files import ADAPTER_DIR, atomic_dir
from a3lm.model.modeling import A3ForCausalLM, max_positions
from a3lm.quiet import quiet_transformers
from a3lm.training import build, lora, optim
from a3lm.training import checkpoint as ckpt
from a3lm.training.callbacks import Callback
from a3lm.training.config import TrainConfig
from a3lm.training.curriculum import CurriculumConfig, GroupPolicy, describe, draw_group_ids, policy_at
from a3lm.training.distributed import (
    autocast_dtype,
    device_kind,
    full_state_dict,
    init_distributed,
    pick_device,
    trainable_state_dict,
    wrap,
)
from a3lm.training.metrics import MetricsLog, ProgressBar
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


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) was NaN/inf: the step was not taken."""


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


class Trainer:
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
        self.checkpoints = ckpt.CheckpointManager(self.ckpt_root, cfg.checkpoint.keep, self.dist.rank,
                                                  self.dist.world_size, self.dist.barrier)
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
        loader = build_loader(self.cfg.data, self.tokenizer, self.dist.rank, self.dist.world_size,
                              max_positions=max_positions(self.model))
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
        self.optimizer, self.schedule = optim.for_phase(model, self.cfg.optim, self.cfg.curriculum, phase.kind,
                                                        phase.start, phase.end)
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

    # -- saving ---------------------------------------------------------------------------------

    def _save_model_dir(self, name: str) -> None:
        """run/<name> = model + tokenizer, atomically; every rank calls it (FSDP gathers)."""
        if name == FINAL_DIR and lora.is_adapted(self.model):
            self._save_merged()
            return
        state = full_state_dict(self.model, self.fsdp)
        if self.dist.main:
            atomic_dir(self.out / name, lambda folder: self._save_pretrained(folder, state))
        self.dist.barrier()

    def _save_pretrained(self, folder: Path, state_dict: dict | None = None,
                         model: nn.Module | None = None) -> None:
        with quiet_transformers():
            (model or self.model).save_pretrained(folder, state_dict=state_dict)
        self.tokenizer.save_pretrained(folder)

    def _save_merged(self) -> None:
        """LoRA: run/adapter (peft's format), then run/final (a plain A3 model, the adapters merged into a
        fresh full-precision copy of the frozen base). Every rank calls it (FSDP gathers what trains)."""
        state = trainable_state_dict(self.model, self.fsdp)
        if self.dist.main:
            # a base from scratch draws its init from the global RNG
            with torch.random.fork_rng(devices=[]), quiet_transformers():
                base = build.initial_a3_model(self.cfg, self.tokenizer)
            tuner = lora.restore(base, state, self.cfg.lora)
            atomic_dir(self.out / ADAPTER_DIR,
                            lambda folder: lora.save_adapter(folder, tuner.model, self.cfg.model.path))
            merged = tuner.merge_and_unload()
            atomic_dir(self.out / FINAL_DIR, lambda folder: self._save_pretrained(folder, model=merged))
        self.dist.barrier()

    def rows_per_step(self) -> int:
        return self.cfg.data.micro_batch_size * self.cfg.optim.grad_accum * self.dist.world_size

    def save_checkpoint(self) -> Path:
        """Every registered part (sharded under FSDP), plus what a resume must know before building."""
        meta = {"step": self.step, "tokens_seen": self.tokens_seen, "phase": self.phase.kind,
                "rows_per_step": self.rows_per_step(), "model_config": self.model.config.to_dict(),
                "policy": asdict(policy_at(self.cfg.curriculum, max(self.step - 1, 0)))}
        path = self.checkpoints.save(self.step, meta)
        self._emit("on_save", path)
        return path

    def _resume_skeleton(self, path: Path) -> tuple[Phase, nn.Module]:
        """The phase of checkpoint `path` and a model of its architecture (weights loaded later)."""
        try:
            meta = ckpt.read_meta(path)
        except FileNotFoundError as e:
            raise ValueError(f"checkpoint {path} has no {ckpt.META_FILE}: it was written by an older a3lm; "
                             "start a new --output") from e
        if meta["rows_per_step"] != self.rows_per_step():
            raise ValueError(
                f"checkpoint {path} was trained with {meta['rows_per_step']} rows per step; this run has "
                f"data.micro_batch_size {self.cfg.data.micro_batch_size} x optim.grad_accum "
                f"{self.cfg.optim.grad_accum} x {self.dist.world_size} processes = {self.rows_per_step()}: "
                "change data.micro_batch_size or optim.grad_accum so the product matches"
            )
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        # the phase the saved model belongs to (the step may sit exactly at its end)
        phase = next(p for p in self.phases if p.kind == meta["phase"] and p.start < self.step <= p.end)
        if self.cfg.lora.enabled:  # the checkpoint holds what trains; the frozen rest is the run's model
            return phase, build.initial_model(self.cfg, phase.kind, self.tokenizer)
        return phase, build.skeleton(meta["model_config"])

    # -- one optimizer step ---------------------------------------------------------------------

    def _micro_loss(self, batch: dict[str, torch.Tensor], policy: GroupPolicy) -> tuple[torch.Tensor, int]:
        """(mean loss over the micro-batch's targets, number of targets); batch input_ids [B, N].

        Instruction batches carry labels (-100 off the answers) and known_mask (BOS and prompt, the
        first groups); packed rows have every token after BOS as a target.
        """
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        labels = batch["labels"].to(self.device) if "labels" in batch else ids
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        if policy.order == "ar":
            with amp:
                logits = self.ddp_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            # next-token loss in fp32 (HF's label shift); -100 marks no target (instruction data)
            targets = labels[:, 1:].flatten()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=-100)
            return loss, int((targets != -100).sum())
        group_ids = draw_group_ids(policy, batch["attention_mask"], self.group_gen, batch.get("known_mask"))
        with amp:
            out = self.ddp_model(input_ids=ids, group_ids=group_ids.to(self.device), attention_mask=mask,
                                 labels=labels)
        return out.loss, int(out.num_targets)

    def _no_sync(self, last: bool) -> Any:
        """Gradients are reduced once per step, after the last micro-batch."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        elif self.dist.enabled and not last:
            return self.ddp_model.no_sync()
        return nullcontext()

    def _check_finite(self, loss: torch.Tensor, policy: GroupPolicy) -> None:
        finite = self.dist.all_reduce(torch.isfinite(loss.detach()).float(), dist.ReduceOp.MIN)
        if not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss.detach()):.4g} on rank {self.dist.rank}) at step {self.step} "
                f"({describe(policy)}): the optimizer did not step, so the weights are those after step "
                f"{self.step - 1}; the last checkpoint is intact. Lower optim.lr or use precision=fp32"
            )

    def _backward(self, batches: list[dict[str, torch.Tensor]], policy: GroupPolicy) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the gradient of the global per-target mean loss; (loss sum, global target count)."""
        # Every grouping puts BOS (and an instruction's prompt) first, so the targets are known before
        # the forward, for exact weighting: every token after BOS of a packed row, the answer's tokens
        # (labels != -100) of an instruction row, under both objectives.
        counts = [int((b["labels"][:, 1:] != -100).sum()) if "labels" in b else b["input_ids"][:, 1:].numel()
                  for b in batches]
        total = self.dist.all_reduce(torch.tensor(float(sum(counts)), device=self.device))
        loss_sum = torch.zeros((), device=self.device)
        for i, (batch, n) in enumerate(zip(batches, counts, strict=True)):
            with self._no_sync(i == len(batches) - 1):
                loss, n_targets = self._micro_loss(batch, policy)
                if n_targets != n:
                    raise RuntimeError(f"expected {n} targets in micro-batch, the model counted {n_targets}")
                self._check_finite(loss, policy)
                # DDP averages gradients over ranks: scale so the result is the global per-token mean
                (loss * (n * self.dist.world_size / total)).backward()
            loss_sum += loss.detach() * n
        return loss_sum, total

    def _clipped_grad_norm(self, policy: GroupPolicy) -> float:
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite gradient norm at step {self.step} ({describe(policy)}): the optimizer "
                                     "did not step. Lower optim.lr or use precision=fp32")
        return float(grad_norm)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches, loss weighted per target token globally."""
        policy = policy_at(self.cfg.curriculum, self.step)
        batches = [self.loader.next_batch() for _ in range(self.cfg.optim.grad_accum)]
        loss_sum, total = self._backward(batches, policy)
        grad_norm = self._clipped_grad_norm(policy)
        lr = self.schedule.lr()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        real = torch.tensor(float(sum(int(b["attention_mask"].sum()) for b in batches)), device=self.device)
        tokens = int(self.dist.all_reduce(real))  # padding of instruction rows is not counted
        self.step += 1
        self.tokens_seen += tokens
        loss = float(self.dist.all_reduce(loss_sum) / total)
        return {"step": self.step, "stage": policy.stage, "group_size": policy.size, "order": policy.order,
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen,
                "step_tokens": tokens, "source_tokens": self._source_tokens()}

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
        """One step, its callbacks and the saves due after it; the checkpoint where `stop_after` ends the run."""
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
