"""What a run leaves besides its checkpoints: run/ar_final and run/final (model + tokenizer,
`save_pretrained`), and under LoRA run/adapter (peft's format) beside a merged run/final."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from a3lm.files import ADAPTER_DIR, FINAL_DIR, atomic_dir
from a3lm.quiet import quiet_transformers
from a3lm.training import build, lora
from a3lm.training.config import TrainConfig
from a3lm.training.distributed import Dist, full_state_dict, trainable_state_dict


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


def save_lora_outputs(model: nn.Module, tokenizer: Any, out: Path, cfg: TrainConfig, dist: Dist, fsdp: bool) -> None:
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
