"""HellaSwag, PIQA, Winogrande, SIQA (and TriviaQA) through the harness's own task definitions.

By default the harness loads each task's data from the Hugging Face hub. With a data directory, every
task reads `DATA_DIR/<name>/validation.jsonl` instead (the hub dataset's validation split, one JSON
object per line, same fields): a local task yaml that `include`s the harness's yaml and swaps the
dataset for that file, so prompts, choices and metrics stay the harness's.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lm_eval
import lm_eval.evaluator
import transformers
import yaml
from lm_eval.api.model import LM
from lm_eval.loggers.utils import get_commit_from_path
from lm_eval.tasks import TaskManager

HARNESS_TASK_DIR = Path(lm_eval.__file__).parent / "tasks"


class MissingDataError(FileNotFoundError):
    """Benchmark data is neither on the hub (reachable) nor in the data directory."""


@dataclass(frozen=True)
class HarnessTask:
    """name: ours (CLI, data folder); task: the harness's; yaml: its config under lm_eval/tasks."""

    name: str
    task: str
    yaml: str
    hub: str
    fields: str
    required: tuple[str, ...]  # the fields its prompt and answer read

    def local_file(self, data_dir: str | Path) -> Path:
        return Path(data_dir) / self.name / "validation.jsonl"


HARNESS_TASKS = {
    t.name: t
    for t in (
        HarnessTask(
            "hellaswag",
            "hellaswag",
            "hellaswag/hellaswag.yaml",
            "Rowan/hellaswag",
            "ctx_a, ctx_b, ctx, activity_label, endings (4), label",
            ("ctx_a", "ctx_b", "ctx", "activity_label", "endings", "label"),
        ),
        HarnessTask(
            "piqa",
            "piqa",
            "piqa/piqa.yaml",
            "baber/piqa",
            "goal, sol1, sol2, label",
            ("goal", "sol1", "sol2", "label"),
        ),
        HarnessTask(
            "winogrande",
            "winogrande",
            "winogrande/default.yaml",
            "allenai/winogrande (winogrande_xl)",
            "sentence (with _), option1, option2, answer ('1' or '2')",
            ("sentence", "option1", "option2", "answer"),
        ),
        HarnessTask(
            "siqa",
            "social_iqa",
            "siqa/siqa.yaml",
            "lighteval/siqa",
            "context, question, answerA, answerB, answerC, label ('1'..'3')",
            ("context", "question", "answerA", "answerB", "answerC", "label"),
        ),
        HarnessTask(
            "triviaqa",
            "triviaqa",
            "triviaqa/default.yaml",
            "mandarjoshi/trivia_qa (rc.nocontext)",
            "question, answer: {aliases: [...], value}",
            ("question", "answer"),
        ),
    )
}


def missing_data_message(tasks: list[HarnessTask], data_dir: str | Path | None, reason: str = "") -> str:
    """Which files are missing, where to put them, what they hold."""
    where = data_dir if data_dir is not None else "DATA_DIR"
    lines = [reason] if reason else []
    lines.append(
        "Put each benchmark's validation split as JSON lines (the hub dataset's fields) at these paths, "
        + ("then rerun:" if data_dir is not None else "then rerun with --data-dir DATA_DIR:")
    )
    for t in tasks:
        lines.append(f"  {t.local_file(where)}  <- {t.hub} validation; fields: {t.fields}")
    return "\n".join(lines)


# the answer field of each task and the values the harness's yaml reads as an answer: any other value
# fails deep in the harness (Winogrande) or silently scores as wrong (a SIQA "B", a PIQA "1")
LABELS = {
    "hellaswag": ("label", (0, 1, 2, 3, "0", "1", "2", "3"), "0..3 (an int or a digit string)"),
    "piqa": ("label", (0, 1), "0 or 1 (an int)"),
    "winogrande": ("answer", ("1", "2"), '"1" or "2" (a string)'),
    "siqa": ("label", (1, 2, 3, "1", "2", "3"), '"1", "2" or "3" (or an int)'),
}


def doc_problem(task: HarnessTask, doc: dict[str, Any]) -> str | None:
    """What keeps one document from being read as the harness reads it (None: nothing)."""
    absent = [f for f in task.required if f not in doc]
    if absent:
        return f"lacks field(s) {', '.join(absent)} ({task.name} reads {task.fields})"
    if task.name in LABELS:
        field, allowed, expected = LABELS[task.name]
        value = doc[field]
        if isinstance(value, bool) or value not in allowed:
            return f"has {field} {json.dumps(value)}: {task.name} expects {expected}"
    if task.name == "winogrande" and "_" not in str(doc["sentence"]):
        return "has no _ in its sentence (the blank that option1 / option2 fill)"
    answer = doc.get("answer")
    if task.name == "triviaqa" and not (isinstance(answer, dict) and isinstance(answer.get("aliases"), list)):
        return "has no answer.aliases list (triviaqa reads answer: {aliases: [...], value})"
    return None


def check_local_file(task: HarnessTask, path: Path) -> None:
    """An empty file, a line that is not a JSON object, one without a field the task reads or with an
    answer value the harness would misread: one error naming the file, the line and the problem (not a
    template error deep in the harness, nor a silent wrong score)."""
    from a3lm.data.sources import local_file_problem

    problem = local_file_problem(path)
    if problem:
        raise ValueError(f"benchmark file {path}{' ' if problem.startswith('is ') else ': '}{problem}")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and (problem := doc_problem(task, json.loads(line))):
            raise ValueError(f"benchmark file {path}: line {n} {problem}")


def missing_files_message(tasks: list[HarnessTask], data_dir: str | Path) -> str | None:
    """What `missing_data_message` says of the tasks whose local file is absent (None: none is)."""
    missing = [t for t in tasks if not t.local_file(data_dir).is_file()]
    return (
        missing_data_message(missing, data_dir, f"missing benchmark data in {data_dir}.") if missing else None
    )


def local_task_dir(tasks: list[HarnessTask], data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write one yaml per task into out_dir: the harness's config with the dataset swapped for a
    local file."""
    if message := missing_files_message(tasks, data_dir):
        raise MissingDataError(message)
    for t in tasks:
        check_local_file(t, t.local_file(data_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        config = {
            "include": str(HARNESS_TASK_DIR / t.yaml),  # absolute: its !function helpers resolve next to it
            "task": t.task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(t.local_file(data_dir).resolve())}},
            "training_split": None,  # zero-shot: the local file only holds the validation split
            "validation_split": "validation",
            "test_split": None,
        }
        (out / f"{t.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def run_harness(
    lm: LM,
    names: list[str],
    limit: int | float | None = None,
    data_dir: str | Path | None = None,
    num_fewshot: int | None = None,
    seed: int = 1234,
    task_manager: TaskManager | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Run harness tasks by our names (see HARNESS_TASKS) or, with a task_manager, any harness task name.

    Returns ({name: {metric: value}}, {name: per-document samples}): the harness's metric names ("acc",
    "acc_norm", "exact_match", and their "_stderr") with filter suffixes (",none") dropped, and each
    document's prompt, responses, filtered responses, target and metrics.
    """
    unknown = [n for n in names if n not in HARNESS_TASKS and task_manager is None]
    if unknown:
        raise ValueError(f"unknown harness task(s) {unknown}; choose from {', '.join(HARNESS_TASKS)}")
    specs = [HARNESS_TASKS[n] for n in names if n in HARNESS_TASKS]
    task_names = {HARNESS_TASKS[n].task if n in HARNESS_TASKS else n: n for n in names}
    with tempfile.TemporaryDirectory(prefix="a3lm-tasks-") as tmp, quiet_harness():
        if task_manager is None:
            if data_dir is not None:
                # our yamls only: faster than indexing every harness task, and no name clash
                task_manager = TaskManager(
                    include_path=str(local_task_dir(specs, data_dir, tmp)), include_defaults=False
                )
            else:
                task_manager = TaskManager()
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                # the arguments the harness reports (and checks for an instruct model): a dict, so that
                # its messages read "pretrained=DIR", not "pretrained=pretrained=DIR"
                model_args={"pretrained": getattr(lm, "model_path", type(lm).__name__)},
                tasks=list(task_names),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=task_manager,
                log_samples=True,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except (ConnectionError, OSError) as err:
            if data_dir is not None or isinstance(err, MissingDataError):
                raise
            raise MissingDataError(
                missing_data_message(specs, None, f"could not load the benchmark data from the hub ({err}).")
            ) from err
    results = {}
    for task, metrics in out["results"].items():
        if task in task_names:
            results[task_names[task]] = {
                k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, int | float)
            }
    samples = {task_names[t]: s for t, s in out.get("samples", {}).items() if t in task_names}
    return results, samples


def _quiet_git_commit_hash() -> str | None:
    """The harness's get_git_commit_hash without git's "fatal: not a git repository" on stderr."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)  # noqa: S607
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


def _brief_env_info(storage: dict[str, Any]) -> None:
    """The harness's add_env_info without torch's environment survey (about 5 s of subprocesses per
    run, every row); a3lm's results JSON records the package versions itself."""
    storage.update({"transformers_version": transformers.__version__, "lm_eval_version": version("lm_eval")})


@contextmanager
def quiet_harness() -> Iterator[None]:
    """While the harness runs: look the commit up without git's complaint on stderr (outside a git
    checkout `git describe` prints "fatal: not a git repository" on every run), and skip its slow
    environment survey."""
    patched = {"get_git_commit_hash": _quiet_git_commit_hash, "add_env_info": _brief_env_info}
    original = {name: getattr(lm_eval.evaluator, name) for name in patched}
    for name, fn in patched.items():
        setattr(lm_eval.evaluator, name, fn)
    try:
        yield
    finally:
        for name, fn in original.items():
            setattr(lm_eval.evaluator, name, fn)
