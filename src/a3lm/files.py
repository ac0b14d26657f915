"""Where things live on disk: run-folder names, atomic writes, and checks of model paths."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
LOCK_FILE = ".a3lm.lock"  # held (flock) by the `a3lm train` writing the folder; holds its PID

REMOTE_CODE_REFUSAL = "this folder asks to run its own code; a3lm does not"


def check_output_file(path: str | Path, what: str = "--output") -> Path:
    """An output that must be a file: refused before any work if it names a folder."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder: give a file name (e.g. {p / 'results.json'})")
    return p


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one.

    The temporary file is created by mkstemp (O_CREAT | O_EXCL, a fresh random name) in the target's
    folder: a file or symlink planted under a predictable name cannot redirect the write. It is
    fsynced before os.replace, which swaps the name itself (a symlink at `path` is replaced, not
    followed), then the folder is fsynced so the rename survives a power cut.
    """
    path = check_output_file(path, "output")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the group
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: str | Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log. A torn last line (a kill during an append: no newline, not
    JSON) is dropped; a bad line elsewhere is damage and an error naming the file and line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the append never finished
                break
            raise ValueError(f"{path} line {i + 1} is not JSON ({e}): the file is damaged") from e
    return records


def drop_torn_line(path: str | Path) -> None:
    """Cut a file back to its last newline (a torn last line of a log), so an append starts a new line."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
            os.fsync(fh.fileno())


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it: a kill leaves at most a torn last line, which readers drop."""
    drop_torn_line(path)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def refuse_remote_code(path: str | Path) -> None:
    """Read a local model folder's config files before transformers does. a3lm runs only the model
    families it knows: a folder whose config or tokenizer config names its own code (`auto_map`) is
    refused before transformers could offer to run it. An A3 config without its decoder's config
    (`text_config`) is refused too: transformers would build its default 32-layer Llama."""
    p = Path(path).expanduser()
    for name in ("config.json", "tokenizer_config.json"):
        f = p / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f} is not JSON: {e}") from e
        inner = data.get("text_config") if isinstance(data, dict) else None
        if isinstance(data, dict) and ("auto_map" in data or isinstance(inner, dict) and "auto_map" in inner):
            raise ValueError(f"{path}: {REMOTE_CODE_REFUSAL} ({name} has an auto_map naming Python files)")
        if name == "config.json" and isinstance(data, dict) and data.get("model_type") == "a3":
            check_text_config(data, str(f))


def check_text_config(config: dict[str, Any], where: str) -> None:
    """An A3 config must carry the config of the decoder it wraps."""
    if not isinstance(config.get("text_config"), dict) or "model_type" not in config["text_config"]:
        raise ValueError(
            f"{where} is an A3 config without text_config (the decoder's config, with its "
            "model_type): refusing to build a default decoder in its place"
        )


def check_model_path(path: str, what: str = "model") -> None:
    """A path that names a local folder must be one holding config.json; a Hub id (org/name) passes.
    A path whose first folder exists here (runs/typo) is local: a typo must not become a Hub request."""
    p = Path(path).expanduser()
    looks_local = p.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1 or p.exists()
    if not (looks_local or Path(p.parts[0]).is_dir()):
        return
    if not p.is_dir():
        raise FileNotFoundError(
            f"no {what} folder at {path}: expected a save_pretrained directory (or a Hub id org/name)"
        )
    if (p / CHECKPOINTS_DIR).is_dir() or (p / FINAL_DIR / "config.json").is_file():  # `a3lm train`'s output
        raise FileNotFoundError(f"{path} is a training run folder: its model is {p / FINAL_DIR}")
    if what == "model" and not (p / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a Hugging Face model folder")
    refuse_remote_code(p)


def require_a3(path: str) -> None:
    """Refuse a plain decoder where an A3 model is needed (sampling, scoring): its query vector would
    be random and every prediction garbage. The message says how to get an A3 checkpoint."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{path} is a file, not a model folder")
    check_model_path(path)
    model_type = getattr(AutoConfig.from_pretrained(path, trust_remote_code=False), "model_type", None)
    if model_type != "a3":
        raise ValueError(
            f"{path} is a plain {model_type} decoder, not an A3 model (its query vector would be random): "
            f"run `a3lm convert {path} OUT` (zero-shot) or `a3lm train --model {path}` first"
        )


def check_weight_shapes(folder: str | Path, expected: dict[str, tuple[int, ...]]) -> None:
    """The weight files of a model folder hold tensors of the shapes its config.json makes (read from
    the safetensors headers only): a mismatch is one line before any weight is allocated."""
    from safetensors import SafetensorError, safe_open

    p = Path(folder).expanduser()
    for f in sorted(p.glob("*.safetensors")) if p.is_dir() else []:
        try:
            with safe_open(str(f), framework="pt") as fh:
                names = [k for k in fh.keys() if k in expected]  # noqa: SIM118 (not a dict)
                shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in names}
        except SafetensorError:
            return  # a damaged file: the loader's own error names it
        for k, shape in shapes.items():
            if shape != tuple(expected[k]):
                raise ValueError(
                    f"the weights in {f} do not fit {p / 'config.json'}: {k} is {list(shape)} "
                    f"there, {list(expected[k])} by the config"
                )


def check_tokenizer_files(path: str | Path) -> None:
    """A local model folder used for text must hold its tokenizer (checked before the weights load)."""
    p = Path(path).expanduser()
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    if p.is_dir() and not any((p / n).is_file() for n in names):
        raise FileNotFoundError(
            f"{path} holds no tokenizer (tokenizer.json or tokenizer_config.json): "
            "save the tokenizer beside the weights (tokenizer.save_pretrained)"
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
