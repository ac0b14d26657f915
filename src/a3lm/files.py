"""Where things live on disk: run-folder names, atomic writes, and checks of model paths."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import AutoConfig

# A training run folder (`a3lm train --output`): see `a3lm.training.run_folder` for what each holds.
AR_DIR = "ar_final"
FINAL_DIR = "final"
ADAPTER_DIR = "adapter"  # LoRA runs: the adapters in peft's format, beside final/ (merged)
CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"
CHECKPOINT_PREFIX = "step_"  # checkpoints/step_00000100
TMP_PREFIX = ".tmp-"  # a folder being written aside

def check_model_path(path: str, what: str = "model") -> None:
    """A path that names a local folder must be one holding config.json; a Hub id (org/name) passes.
    A path whose first folder exists here (runs/typo) is local: a typo must not become a Hub request."""
    p = Path(path).expanduser()
    looks_local = p.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1 or p.exists()
    if not (looks_local or Path(p.parts[0]).is_dir()):
        return
    if not p.is_dir():
        raise FileNotFoundError(f"no {what} folder at {path}: expected a save_pretrained directory (or a Hub id org/name)")
    if (p / CHECKPOINTS_DIR).is_dir() or (p / FINAL_DIR / "config.json").is_file():  # `a3lm train`'s output
        raise FileNotFoundError(f"{path} is a training run folder: its model is {p / FINAL_DIR}")
    if what == "model" and not (p / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a Hugging Face model folder")


def require_a3(path: str) -> None:
    """Refuse a plain decoder where an A3 model is needed (sampling, scoring): its query vector would
    be random and every prediction garbage. The message says how to get an A3 checkpoint."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{path} is a file, not a model folder")
    check_model_path(path)
    model_type = getattr(AutoConfig.from_pretrained(path), "model_type", None)
    if model_type != "a3":
        raise ValueError(
            f"{path} is a plain {model_type} decoder, not an A3 model (its query vector would be random): "
            f"run `a3lm convert {path} OUT` (zero-shot) or `a3lm train --model {path}` first"
        )


def model_name(path: str) -> str:
    """A readable row name: the folder's name, or the run's for a run's output (runs/x/final -> x)."""
    p = Path(path.rstrip("/"))
    if p.suffix == ".gguf":
        return p.stem
    if not p.exists():  # a hub id: keep it whole
        return path
    if p.name == FINAL_DIR:
        return p.parent.name or p.name
    if p.name == AR_DIR or p.name.startswith(CHECKPOINT_PREFIX):
        run = p.parent.parent if p.parent.name == CHECKPOINTS_DIR else p.parent
        return f"{run.name}/{p.name}"
    return p.name


# -- atomic writes ---------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under path (the data must be on disk before the rename is)."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for f in filenames:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a whole folder (e.g. run/final) aside and swap it in: readers never see half of it."""
    target = Path(target)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_tree(tmp)
    if target.exists():
        old = target.parent / f"{TMP_PREFIX}old-{target.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    fsync_path(target.parent)
    return target
