"""Atomic, rotating checkpoint folders: written aside, fsynced, then renamed into place.

    <root>/step_00000200/    a complete checkpoint (only complete ones ever carry this name)
    <root>/.tmp-step_00000300/  one being written; a crash leaves it behind, and it is ignored/removed

A rename within one file system is atomic, so a kill at any moment leaves either the previous
checkpoints only, or those plus the new complete one. `save`/`atomic_dir` make any folder write
atomic; `CheckpointManager` writes a training run's registered parts into such a folder, sharded
(torch.distributed.checkpoint), and loads them back into any number of processes.

Nothing read from a checkpoint can run code (run folders get shared: "resume my run"): per-rank
states are safetensors files with a JSON tree (`save_state` / `load_state`, no pickle); DCP's
pickled `state/.metadata` is checked against the sha256 recorded in meta.json, then read by an
unpickler that builds only DCP's own metadata classes; DCP's byte items go through torch's
weights_only loader. See docs/security.md for what is trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from a3lm.files import CHECKPOINT_PREFIX, TMP_PREFIX, fsync_path, fsync_tree

PREFIX = CHECKPOINT_PREFIX
META_FILE = "meta.json"
STATE_DIR = "state"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards (a pickle)
STATE_SUFFIX = ".safetensors"  # a per-rank part's file: <part>_rank<r>.safetensors
LEGACY_SUFFIX = ".pt"  # before: torch.save pickles, now read only through torch's weights_only loader
_STATE_KEY = "a3lm_state"  # the safetensors metadata entry holding the JSON tree
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


# -- per-rank state without pickle ------------------------------------------------------------------


def _encode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """x as a JSON tree; tensors and arrays go to `tensors`, named by the node that points at them."""
    if isinstance(x, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = x.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(x, np.ndarray):  # NumPy's RNG state: raw bytes + dtype + shape (exact for any dtype)
        key = f"t{len(tensors)}"
        tensors[key] = torch.frombuffer(bytearray(np.ascontiguousarray(x).tobytes()), dtype=torch.uint8)
        return {"ndarray": key, "dtype": x.dtype.str, "shape": list(x.shape)}
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise TypeError(f"state keys must be strings, got {list(x)}")
        return {"dict": {k: _encode(v, tensors) for k, v in x.items()}}
    if isinstance(x, tuple | list):
        return {"tuple" if isinstance(x, tuple) else "list": [_encode(v, tensors) for v in x]}
    if x is None or isinstance(x, bool | int | float | str):
        return {"value": x}
    raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint state")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict) or len(node) not in (1, 3):
        raise ValueError(f"not an a3lm state node: {str(node)[:80]}")
    if "value" in node:
        return node["value"]
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "ndarray" in node:
        dtype = np.dtype(node["dtype"])
        if dtype.kind not in "biuf":  # numbers only: never an object array
            raise ValueError(f"array dtype {dtype} is not a number type")
        data = tensors[node["ndarray"]].numpy().tobytes()
        return np.frombuffer(data, dtype=dtype).reshape(node["shape"]).copy()
    if "dict" in node:
        return {k: _decode(v, tensors) for k, v in node["dict"].items()}
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    return [_decode(v, tensors) for v in node["list"]]


def save_state(state: Any, path: Path) -> None:
    """A nested state (dicts, lists, tuples, numbers, strings, tensors, NumPy arrays) as one
    safetensors file: the tensors as tensors, the structure as JSON in its header. Bit-exact."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    save_file(tensors, str(path), metadata={_STATE_KEY: json.dumps(tree)})


def load_state(path: Path) -> Any:
    """The state `save_state` wrote; reading it runs no code whatever the file holds."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if _STATE_KEY not in header:
            raise ValueError(f"{Path(path).name} is not an a3lm state file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    try:
        return _decode(json.loads(header[_STATE_KEY]), tensors)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{Path(path).name} holds a malformed state ({type(e).__name__}: {e})") from e


def _load_legacy_state(path: Path) -> Any:
    """A per-rank state written with torch.save by an earlier a3lm: torch's weights_only loader,
    which builds only tensors, containers and (allowed here) NumPy arrays, never arbitrary objects."""
    from numpy._core.multiarray import _reconstruct

    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")  # the refusal says enough
        return torch.load(path, weights_only=True)


def _state_file(folder: Path, name: str, rank: int) -> Path:
    new = folder / f"{name}_rank{rank}{STATE_SUFFIX}"
    legacy = new.with_suffix(LEGACY_SUFFIX)
    return legacy if not new.exists() and legacy.exists() else new


def _read_state_file(path: Path) -> Any:
    return _load_legacy_state(path) if path.suffix == LEGACY_SUFFIX else load_state(path)


# -- DCP without arbitrary unpickling ----------------------------------------------------------------

# What DCP's .metadata pickle refers to: its own dataclasses, torch.Size, dtypes and layouts, a path.
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: any other global (os.system, builtins.eval ...) is refused
    before it is looked up, so a crafted .metadata cannot call it."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DCP_METADATA_CLASSES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{STATE_DIR}/{DCP_METADATA} refers to {module}.{name}, which a "
            "checkpoint's metadata never holds: refusing to load it"
        )


class _SafeReader(FileSystemReader):
    """DCP's file reader with its metadata read by `_MetadataUnpickler` instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        with open(Path(self.path) / DCP_METADATA, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but a byte item (a non-tensor value: an LR, a step count) is unpickled by torch's
    weights_only loader; the checked value is handed on re-serialized, so DCP's own load sees only it."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        checked = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_digest(state_dir: Path) -> dict[str, Any]:
    """What meta.json records of the DCP folder: every file's size, and the sha256 of the pickled
    .metadata (the shards are read only as tensors and weights_only items: their sizes suffice)."""
    files = sorted(p for p in Path(state_dir).iterdir() if p.is_file())
    return {
        "sizes": {p.name: p.stat().st_size for p in files},
        "sha256": {DCP_METADATA: _sha256(Path(state_dir) / DCP_METADATA)},
    }


def verify_state(path: Path, meta: dict[str, Any]) -> None:
    """Before torch opens anything: the DCP files are those this checkpoint's save recorded."""
    recorded = meta.get("state_files")
    if recorded is None:  # written before digests were recorded: the restricted readers still apply
        return
    state = Path(path) / STATE_DIR
    for name, size in recorded["sizes"].items():
        f = state / name
        if not f.is_file():
            raise _unreadable(path, f"{STATE_DIR}/{name} is missing")
        if f.stat().st_size != size:
            raise _unreadable(path, f"{STATE_DIR}/{name} has {f.stat().st_size} bytes, {size} when saved")
    for name, digest in recorded["sha256"].items():
        if _sha256(state / name) != digest:
            raise _unreadable(
                path, f"{STATE_DIR}/{name} does not match the sha256 in {META_FILE}: damaged or altered"
            )


# -- the checkpoint manager --------------------------------------------------------------------------


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointManager:
    """Saves and restores every stateful part of a run as one atomic checkpoint folder.

        step_N/meta.json            small facts read before anything is built (step, phase, world size)
        step_N/state/               torch.distributed.checkpoint (DCP) of the shared parts
        step_N/<part>_rank<r>.safetensors   each per-rank part, one file per rank (`save_state`)

    Shared parts (model, optimizer, LR schedule) go through DCP: every rank writes the shards it
    owns (FSDP's DTensors; with replicated weights DCP writes one copy) and a load reads the saved
    shards into whatever sharding the parts have now, so a checkpoint resumes on any number of
    processes. Per-rank parts (data position, RNG streams) are written by their own rank; on a
    world size other than the saved one, a part's `load_resharded(states_of_every_old_rank)` decides
    how to continue (a part without it refuses the change).

    Every rank calls `save`/`load` (DCP's collectives); rank 0 alone creates, renames and prunes.
    """

    def __init__(
        self,
        root: Path,
        keep: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = lambda: None,
    ):
        self.root, self.keep, self.rank, self.world_size, self.barrier = (
            Path(root),
            keep,
            rank,
            world_size,
            barrier,
        )
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
        import torch.distributed.checkpoint as dcp

        tmp = self.root / f"{TMP_PREFIX}{checkpoint_name(step)}"
        meta = meta | {"world_size": self.world_size}
        if self.rank == 0:
            begin(self.root, step)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        self.barrier()
        for name, part in self.per_rank.items():
            save_state(part.state_dict(), tmp / f"{name}_rank{self.rank}{STATE_SUFFIX}")
        with _single_process_quiet():
            try:
                dcp.save(dict(self.shared), checkpoint_id=tmp / STATE_DIR, no_dist=self.world_size == 1)
            except dcp.CheckpointException as e:  # a BaseException: `except Exception` would miss it
                raise OSError(
                    f"could not write checkpoint {self.root / checkpoint_name(step)}: {_failures(e)}"
                ) from e
        self.barrier()  # every rank's files are written before rank 0 makes them the checkpoint
        if self.rank == 0:
            meta["state_files"] = state_digest(tmp / STATE_DIR)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            commit(tmp, keep=self.keep)
        self.barrier()
        return self.root / checkpoint_name(step)

    def load(self, path: Path) -> None:
        """Restore every registered part from `path`, resharding to this world size."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        meta = read_meta(path)
        verify_state(path, meta)
        try:  # read once here: a refused or damaged index is one short message, not DCP's per-rank report
            _SafeReader(path / STATE_DIR).read_metadata()
        except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ValueError) as e:
            raise _unreadable(path, str(e) or type(e).__name__) from e
        with _reading(path), _single_process_quiet():
            dcp.load(
                dict(self.shared),
                storage_reader=_SafeReader(path / STATE_DIR),
                planner=_SafeLoadPlanner(),
                no_dist=self.world_size == 1,
            )
        saved_world = meta["world_size"]
        for name, part in self.per_rank.items():
            if name in self.optional and not _state_file(path, name, 0).exists():
                continue
            same = saved_world == self.world_size
            if not same and not hasattr(part, "load_resharded"):
                raise ValueError(
                    f"checkpoint {path} was written by {saved_world} processes and its {name!r} "
                    f"state cannot be resharded: resume with {saved_world} processes"
                )
            with _reading(path):
                states = [
                    _read_state_file(_state_file(path, name, r))
                    for r in ([self.rank] if same else range(saved_world))
                ]
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
    fallback = (
        f"delete it to resume from the previous checkpoint {earlier[-1]}"
        if earlier
        else "no earlier checkpoint is kept: delete it to start the run over"
    )
    return OSError(f"checkpoint {path} is unreadable ({problem}); {fallback}")


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process whenever there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def read_meta(path: Path) -> dict[str, Any]:
    text = (Path(path) / META_FILE).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _unreadable(path, f"{META_FILE} is not JSON: {e}") from e
