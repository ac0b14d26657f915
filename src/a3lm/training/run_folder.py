"""The run folder: where a training run keeps everything, and the config that identifies it.

    config.json         the TrainConfig (a rerun with a different config is refused)
    metrics.jsonl       one line per logged step
    wandb_id            the run's wandb id (log.wandb), drawn once: a resume continues the same wandb run
    checkpoints/step_N  see `checkpoint.CheckpointManager`
    ar_final/           stage 0 only: the plain AR model after pretraining (+ tokenizer)
    final/              the A3 model (+ tokenizer), `save_pretrained` (LoRA: the adapters merged in)
    adapter/            LoRA runs: the adapters and query vector in peft's format (`lora.save_adapter`)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from a3lm.files import AR_DIR, CHECKPOINTS_DIR, CONFIG_FILE, FINAL_DIR, METRICS_FILE, WANDB_ID_FILE
from a3lm.training.config import LAYOUT_FIELDS, RESUMABLE_FIELDS, TrainConfig, config_from_dict


def ar_model_dir(output: str | Path) -> Path:
    return Path(output) / AR_DIR


def final_model_dir(output: str | Path) -> Path:
    return Path(output) / FINAL_DIR


def _comparable(d: dict) -> dict:
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items() if k not in RESUMABLE_FIELDS}
    for section, key in LAYOUT_FIELDS:
        d.get(section, {}).pop(key, None)
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b)) for x in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} (saved) vs {b!r} (now)"]


def check_run_folder(out: Path, cfg: TrainConfig, write: bool) -> None:
    """Refuse an output folder holding a different run; record the config in a new one."""
    path = out / CONFIG_FILE
    mine = asdict(cfg)
    if path.exists():
        saved = json.loads(path.read_text())
        # Fields added since that run was written take their defaults; a key this version does not
        # know leaves the saved dict as written, and the diff names it.
        with suppress(TypeError):
            saved = asdict(config_from_dict(saved))
        diffs = _diff(_comparable(saved), _comparable(mine))
        if diffs:
            raise ValueError(
                f"output folder {out} holds a different run (config differs in: {'; '.join(diffs)}). "
                "Choose another --output, or delete the folder to start over"
            )
    elif out.exists() and any(p.name != CONFIG_FILE for p in out.iterdir()):
        raise ValueError(f"output folder {out} is not empty and holds no a3lm run ({CONFIG_FILE} missing)")
    if write:  # the latest layout (micro-batch size, accumulation) is what a rerun compares with
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(mine, indent=2) + "\n")
        os.replace(tmp, path)


def wandb_run_id(out: Path) -> str:
    """The run's wandb id, drawn at its first call and kept in the run folder (the folder's name is
    no id: runs/x/seed0/curriculum and runs/x/seed1/curriculum would share one)."""
    path = out / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)  # wandb ids: letters and digits
    tmp = out / f".{WANDB_ID_FILE}.tmp"
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def discard_run(out: Path) -> None:
    """Remove what a run that never reached a checkpoint wrote (a corrected rerun then starts afresh)."""
    for name in (CONFIG_FILE, METRICS_FILE, WANDB_ID_FILE, CHECKPOINTS_DIR):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    with suppress(OSError):
        out.rmdir()  # only if nothing else (e.g. tensorboard logs) is in it
