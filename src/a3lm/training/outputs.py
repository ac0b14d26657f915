"""What a run leaves besides its checkpoints: run/ar_final and run/final (model + tokenizer,
`save_pretrained`), and under LoRA run/adapter (peft's format) beside a merged run/final."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from a3lm.files import ADAPTER_DIR, FINAL_DIR, atomic_dir
from a3lm.quiet import quiet_transformers
from a3lm.training import build, lora
from a3lm.training import checkpoint as ckpt
from a3lm.training.config import TrainConfig
from a3lm.training.curriculum import policy_at
from a3lm.training.distributed import Dist, full_state_dict, trainable_state_dict

if TYPE_CHECKING:
    from a3lm.training.trainer import Phase


def save_pretrained(folder: Path, model: nn.Module, tokenizer: Any, state_dict: dict | None = None) -> None:
    with quiet_transformers():
        model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def save_model_folder(model: nn.Module, tokenizer: Any, folder: Path, dist: Dist, fsdp: bool) -> None:
    """folder = model + tokenizer, atomically; every rank calls it (FSDP gathers, rank 0 writes)."""
    state = full_state_dict(model, fsdp)
    if dist.main:
        atomic_dir(folder, lambda tmp: save_pretrained(tmp, model, tokenizer, state))
    dist.barrier()


def save_lora_outputs(
    model: nn.Module, tokenizer: Any, out: Path, cfg: TrainConfig, dist: Dist, fsdp: bool
) -> None:
    """LoRA: run/adapter (peft's format), then run/final (a plain A3 model, the adapters merged into a
    fresh full-precision copy of the frozen base). Every rank calls it (FSDP gathers what trains)."""
    state = trainable_state_dict(model, fsdp)
    if dist.main:
        # a base from scratch draws its init from the global RNG
        with torch.random.fork_rng(devices=[]), quiet_transformers():
            base = build.initial_a3_model(cfg, tokenizer)
        tuner = lora.restore(base, state, cfg.lora)
        atomic_dir(out / ADAPTER_DIR, lambda folder: lora.save_adapter(folder, tuner.model, cfg.model.path))
        merged = tuner.merge_and_unload()
        atomic_dir(out / FINAL_DIR, lambda folder: save_pretrained(folder, merged, tokenizer))
    dist.barrier()


class RunSaving:
    """The trainer's saving and resuming: run/<name> model folders, checkpoints with what a resume must
    know before building, and the phase and model skeleton a checkpoint resumes from. Mixed into
    `Trainer`, whose state (cfg, dist, model, phase, step, checkpoints, ...) these methods read."""

    def _save_model_dir(self, name: str) -> None:
        """run/<name> = model + tokenizer (under LoRA, run/final merged and run/adapter); every rank calls
        it."""
        if name == FINAL_DIR and lora.is_adapted(self.model):
            save_lora_outputs(self.model, self.tokenizer, self.out, self.cfg, self.dist, self.fsdp)
        else:
            save_model_folder(self.model, self.tokenizer, self.out / name, self.dist, self.fsdp)

    def rows_per_step(self) -> int:
        return self.cfg.data.micro_batch_size * self.cfg.optim.grad_accum * self.dist.world_size

    def save_checkpoint(self) -> Path:
        """Every registered part (sharded under FSDP), plus what a resume must know before building."""
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "phase": self.phase.kind,
            "rows_per_step": self.rows_per_step(),
            "model_config": self.model.config.to_dict(),
            "policy": asdict(policy_at(self.cfg.curriculum, max(self.step - 1, 0))),
        }
        path = self.checkpoints.save(self.step, meta)
        self._emit("on_save", path)
        return path

    def _resume_skeleton(self, path: Path) -> tuple[Phase, nn.Module]:
        """The phase of checkpoint `path` and a model of its architecture (weights loaded later)."""
        try:
            meta = ckpt.read_meta(path)
        except FileNotFoundError as e:
            raise ValueError(
                f"checkpoint {path} has no {ckpt.META_FILE}: it was written by an older a3lm; "
                "start a new --output"
            ) from e
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
