"""Atomic, rotating checkpoint folders: written aside, fsynced, then renamed into place.

    <root>/step_00000200/    a complete checkpoint (only complete ones ever carry this name)
    <root>/.tmp-step_00000300/  one being written; a crash leaves it behind, and it is ignored/removed

A rename within one file system is atomic, so a kill at any moment leaves either the previous
checkpoints only, or those plus the new complete one. What goes into a folder is the trainer's
business (`write` callback); this module only makes the write atomic and keeps the last k.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint folder ({PREFIX}NNNNNNNN)")
    return int(m.group(1))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=step_of)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under path (the data must be on disk before the rename is)."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for f in filenames:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def begin(root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (a stale one from a crash is removed)."""
    tmp = Path(root) / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, keep: int | None = None) -> Path:
    """fsync tmp, rename it to its final name, fsync the parent, then drop all but the last `keep`."""
    tmp = Path(tmp)
    final = tmp.parent / tmp.name.removeprefix(TMP_PREFIX)
    fsync_tree(tmp)
    if final.exists():  # the same step saved twice (e.g. a signal right after a periodic save): same state
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    _fsync_path(tmp.parent)
    if keep is not None:
        prune(tmp.parent, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all complete checkpoints but the newest `keep`, and any leftover temporary folder."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    for p in Path(root).iterdir():
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)


def save(root: Path, step: int, write: Callable[[Path], None], keep: int | None = None) -> Path:
    """Single-process atomic save: write(tmp_folder), then commit."""
    tmp = begin(root, step)
    write(tmp)
    return commit(tmp, keep)


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
    _fsync_path(target.parent)
    return target
