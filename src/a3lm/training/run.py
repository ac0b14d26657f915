"""Training: the curriculum on a Hugging Face decoder, data-parallel, resumable bit for bit.

    train(TrainConfig(...)) -> Path of run/final
    train(cfg, callbacks=[...])   # hooks beside the loop (`callbacks.Callback`)

The pieces, one idea each: `config` (the dataclasses, presets, `make_config`), `overrides` (typed
`key=value` settings), `run_folder` (the run's files and its recorded config), `distributed`
(process group, devices, DDP / FSDP2), `build` (tokenizer and first model), `optim` (AdamW and the
LR schedule), `parts` (weights, data position and RNG as checkpointable parts), `metrics` (the
metrics log and progress bar), `trainer` (the loop). This module keeps their public names together.

The run folder (`run_folder`): config.json, metrics.jsonl, checkpoints/step_N (meta.json, state/
through torch.distributed.checkpoint, sharded under FSDP, and data/rng/metrics files per process;
atomic, the last `checkpoint.keep` kept), ar_final/ (stage 0's plain AR model) and final/ (the A3
model, `save_pretrained`).

Distributed: under `torchrun` or `accelerate launch` it trains data-parallel with torch DDP, or with
FSDP2 (`parallel="fsdp"`); a checkpoint resumes on any number of processes as long as the rows per
step (micro_batch_size x grad_accum x processes) stay the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from a3lm.training.callbacks import Callback
from a3lm.training.config import (
    TrainConfig,
)
from a3lm.training.trainer import Trainer


def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Run (or resume) the curriculum described by `config`; returns the folder of the final model.

    With `config.stop_after` set and reached early, returns that step's checkpoint folder instead.
    The stage-0 AR model, when stage 0 runs, is in `ar_model_dir(config.output)`.
    """
    trainer = Trainer(config, callbacks)
    try:
        return trainer.fit()
    except BaseException:  # whatever stopped it (a failed first save too): a failed start leaves nothing
        trainer.discard_if_nothing_saved()
        raise
    finally:
        if trainer.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()
