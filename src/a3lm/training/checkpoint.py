"""Atomic, rotating checkpoint folders: written aside, fsynced, then renamed into place.

    <root>/step_00000200/    a complete checkpoint (only complete ones ever carry this name)
    <root>/.tmp-step_00000300/  one being written; a crash leaves it behind, and it is ignored/removed

A rename within one file system is atomic, so a kill at any moment leaves either the previous
checkpoints only, or those plus the new complete one. `save`/`atomic_dir` make any folder write
atomic; `CheckpointManager` writes a training run's registered parts into such a folder, sharded
(torch.distributed.checkpoint), and loads them back into any number of processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from a3lm.files import CHECKPOINT_PREFIX, TMP_PREFIX, fsync_path, fsync_tree

PREFIX = CHECKPOINT_PREFIX
META_FILE = "meta.json"
STATE_DIR = "state"
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
    fsync_path(tmp.parent)
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


# -- the checkpoint manager --------------------------------------------------------------------------


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointManager:
    """Saves and restores every stateful part of a run as one atomic checkpoint folder.

        step_N/meta.json            small facts read before anything is built (step, phase, world size)
        step_N/state/               torch.distributed.checkpoint (DCP) of the shared parts
        step_N/<part>_rank<r>.pt    each per-rank part, one file per rank

    Shared parts (model, optimizer, LR schedule) go through DCP: every rank writes the shards it
    owns (FSDP's DTensors; with replicated weights DCP writes one copy) and a load reads the saved
    shards into whatever sharding the parts have now, so a checkpoint resumes on any number of
    processes. Per-rank parts (data position, RNG streams) are written by their own rank; on a
    world size other than the saved one, a part's `load_resharded(states_of_every_old_rank)` decides
    how to continue (a part without it refuses the change).

    Every rank calls `save`/`load` (DCP's collectives); rank 0 alone creates, renames and prunes.
    """

    def __init__(self, root: Path, keep: int | None = None, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = lambda: None):
        self.root, self.keep, self.rank, self.world_size, self.barrier = Path(root), keep, rank, world_size, barrier
        self.shared: dict[str, Stateful] = {}
        self.per_rank: dict[str, Stateful] = {}
        self.optional: set[str] = set()

    def register(self, name: str, part: Stateful, per_rank: bool = False, optional: bool = False) -> None:
        """Add (or replace: a new phase brings a new model and optimizer) a part under `name`.

        optional (per-rank parts): a checkpoint without the part's files (written before the part
        existed) leaves it as it is instead of failing.
        """
        (self.per_rank if per_rank else self.shared)[name] = part
        if optional:
            self.optional.add(name)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, step: int, meta: dict[str, Any]) -> Path:
        """Write every registered part for `step`; returns the committed folder (all ranks)."""
        import torch
        import torch.distributed.checkpoint as dcp

        tmp = self.root / f"{TMP_PREFIX}{checkpoint_name(step)}"
        if self.rank == 0:
            begin(self.root, step)
            (tmp / META_FILE).write_text(json.dumps(meta | {"world_size": self.world_size}, indent=2))
        self.barrier()
        for name, part in self.per_rank.items():
            torch.save(part.state_dict(), tmp / f"{name}_rank{self.rank}.pt")
        with _single_process_quiet():
            try:
                dcp.save(dict(self.shared), checkpoint_id=tmp / STATE_DIR, no_dist=self.world_size == 1)
            except dcp.CheckpointException as e:  # a BaseException: `except Exception` would miss it
                raise OSError(f"could not write checkpoint {self.root / checkpoint_name(step)}: {_failures(e)}") from e
        self.barrier()  # every rank's files are written before rank 0 makes them the checkpoint
        if self.rank == 0:
            commit(tmp, keep=self.keep)
        self.barrier()
        return self.root / checkpoint_name(step)

    def load(self, path: Path) -> None:
        """Restore every registered part from `path`, resharding to this world size."""
        import torch
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        with _reading(path), _single_process_quiet():
            dcp.load(dict(self.shared), checkpoint_id=path / STATE_DIR, no_dist=self.world_size == 1)
        saved_world = read_meta(path)["world_size"]
        for name, part in self.per_rank.items():
            if name in self.optional and not (path / f"{name}_rank0.pt").exists():
                continue
            same = saved_world == self.world_size
            if not same and not hasattr(part, "load_resharded"):
                raise ValueError(f"checkpoint {path} was written by {saved_world} processes and its {name!r} "
                                 f"state cannot be resharded: resume with {saved_world} processes")
            with _reading(path):
                states = [torch.load(path / f"{name}_rank{r}.pt", weights_only=False)
                          for r in ([self.rank] if same else range(saved_world))]
            if same:
                part.load_state_dict(states[0])
            else:
                part.load_resharded(states)


def _failures(err: BaseException) -> str:
    """What went wrong, in one line: each failed rank's exception for a DCP CheckpointException."""
    failures = getattr(err, "failures", None)
    if not failures:
        return f"{type(err).__name__}: {err}".removesuffix(": ")
    return "; ".join(f"rank {r}: {_failures(exc)}" for r, (exc, _trace) in sorted(failures.items()))


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Reading checkpoint `path`: any failure becomes an OSError naming it and what to fall back to."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        yield
    except (CheckpointException, Exception) as e:
        raise _unreadable(path, _failures(e)) from e


def _unreadable(path: Path, problem: str) -> OSError:
    """The error for a damaged checkpoint: which one, why, and the previous one to resume from."""
    path = Path(path)
    earlier = [p for p in list_checkpoints(path.parent) if step_of(p) < step_of(path)]
    fallback = (f"delete it to resume from the previous checkpoint {earlier[-1]}" if earlier
                else "no earlier checkpoint is kept: delete it to start the run over")
    return OSError(f"checkpoint {path} is unreadable ({problem}); {fallback}")


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process whenever there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def read_meta(path: Path) -> dict[str, Any]:
    text = (Path(path) / META_FILE).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _unreadable(path, f"{META_FILE} is not JSON: {e}") from e
