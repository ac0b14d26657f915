"""`python -m a3lm.evaluation ARGS`: the `lm_eval` command with the `a3lm` model registered.

lm-eval 0.4.13 looks models up in its own registry only (no plugin entry points), so plain `lm_eval
--model a3lm` cannot see a model defined outside it; this runs the same CLI after importing ours.

One option of our own, `--data_dir DATA`: offline, the harness tasks read `DATA/<name>/validation.jsonl`
(as `a3lm eval --data-dir`) through task yamls written to a temporary folder and passed on as
`--include_path` (the harness's own prompts and metrics, local data).
"""

from __future__ import annotations

import os
import sys
import tempfile

from lm_eval.__main__ import cli_evaluate

from a3lm.evaluation import lm_eval_adapter  # noqa: F401  (registers "a3lm")
from a3lm.evaluation.tasks import HARNESS_TASKS, MissingDataError, local_task_dir, missing_data_message


def local_data_args(argv: list[str], tmp: str) -> list[str]:
    """argv with `--data_dir DATA` replaced by `--include_path` to yamls (in tmp) over DATA's files."""
    if "--data_dir" not in argv:
        return argv
    i = argv.index("--data_dir")
    if i + 1 == len(argv):
        raise ValueError("--data_dir needs a folder: DATA/<task>/validation.jsonl")
    data_dir, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
    tasks = [t for t in HARNESS_TASKS.values() if t.local_file(data_dir).is_file()]
    if not tasks:
        raise MissingDataError(
            missing_data_message(list(HARNESS_TASKS.values()), data_dir, f"no benchmark data in {data_dir}.")
        )
    return [*rest, "--include_path", str(local_task_dir(tasks, data_dir, tmp))]


def main() -> None:
    """The harness's CLI; a failure is one `error:` line, as in `a3lm` (A3LM_DEBUG=1: the traceback)."""
    with tempfile.TemporaryDirectory(prefix="a3lm-tasks-") as tmp:
        try:
            sys.argv[1:] = local_data_args(sys.argv[1:], tmp)
            cli_evaluate()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:
            if os.environ.get("A3LM_DEBUG"):
                raise
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not isinstance(err, ValueError | OSError | KeyError):
                text = f"{type(err).__name__}: {text} (set A3LM_DEBUG=1 for the traceback)"
            sys.exit(f"error: {text}")


if __name__ == "__main__":
    main()
