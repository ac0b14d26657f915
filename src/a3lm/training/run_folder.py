"""The run folder: where a training run keeps everything, and the config that identifies it.

config.json         the TrainConfig (a rerun with a different config is refused)
.a3lm.lock          flock-ed by the process training in the folder (holds its PID): one at a time
metrics.jsonl       one line per logged step
wandb_id            the run's wandb id (log.wandb), drawn once: a resume continues the same wandb run
checkpoints/step_N  see `checkpoint.CheckpointManager`
ar_final/           stage 0 only: the plain AR model after pretraining (+ tokenizer)
final/              the A3 model (+ tokenizer), `save_pretrained` (LoRA: the adapters merged in)
adapter/            LoRA runs: the adapters and query vector in peft's format (`lora.save_adapter`)
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from a3lm.files import (
    AR_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FINAL_DIR,
    LOCK_FILE,
    METRICS_FILE,
    WANDB_ID_FILE,
    atomic_write,
)
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
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not JSON ({e}): this run folder's config is damaged") from e
        if not isinstance(saved, dict):
            raise ValueError(f"{path} holds no training config (a JSON {type(saved).__name__})")
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
    elif out.exists() and any(p.name not in (CONFIG_FILE, LOCK_FILE) for p in out.iterdir()):
        raise ValueError(f"output folder {out} is not empty and holds no a3lm run ({CONFIG_FILE} missing)")
    if write:  # the latest layout (micro-batch size, accumulation) is what a rerun compares with
        atomic_write(path, json.dumps(mine, indent=2) + "\n")


def wandb_run_id(out: Path) -> str:
    """The run's wandb id, drawn at its first call and kept in the run folder (the folder's name is
    no id: runs/x/seed0/curriculum and runs/x/seed1/curriculum would share one)."""
    path = out / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)  # wandb ids: letters and digits
    atomic_write(path, run_id + "\n")
    return run_id


def discard_run(out: Path) -> None:
    """Remove what a run that never reached a checkpoint wrote (a corrected rerun then starts afresh)."""
    for name in (CONFIG_FILE, METRICS_FILE, WANDB_ID_FILE, CHECKPOINTS_DIR, LOCK_FILE):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    with suppress(OSError):
        out.rmdir()  # only if nothing else (e.g. tensorboard logs) is in it


class RunFolderBusy(RuntimeError):
    """Another process is training in the run folder."""


class RunLock:
    """An exclusive lock on a run folder for one training process (rank 0 under torchrun): a second
    `a3lm train` on the same --output refuses at once, naming the holder's PID.

    fcntl.flock on <out>/.a3lm.lock: the kernel drops it when the holder exits, however it exits, so
    a lock file left behind by a killed run never blocks the rerun. The folder is created if needed;
    `release(clean=True)` removes what taking the lock created (a start that failed).
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.created = not self.out.exists()
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--output {self.out} is a file: a run folder is a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.created_file = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(
                f"run folder {self.out} is in use by another a3lm train (PID {holder}): "
                "wait for it to finish, or choose another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd

    def release(self, clean: bool = False) -> None:
        """Unlock; clean (a start that failed): also remove the lock file and the folder if taking
        the lock created them (the folder only if nothing else is in it)."""
        if self.fd is None:
            return
        if clean and self.created_file:
            self.path.unlink(missing_ok=True)
            if self.created:
                with suppress(OSError):
                    self.out.rmdir()
        os.close(self.fd)
        self.fd = None
