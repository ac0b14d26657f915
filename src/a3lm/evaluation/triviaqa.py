"""TriviaQA (rc.nocontext): greedy generation, exact match after the harness's normalisation.

The run itself is the harness's `triviaqa` task through the adapter's generate_until (see tasks.py:
prompt "Question: ...?\\nAnswer:", stop at newline, period or comma). `exact_match` scores one answer
the way that task does, with the options read from its yaml: strip whitespace (its filter), then
compare with each alias ignoring case and punctuation; right if any alias matches.
"""

from __future__ import annotations

from functools import cache

from lm_eval.api.metrics import exact_match_hf_evaluate
from lm_eval.tasks._yaml_loader import load_yaml

from a3lm.evaluation.tasks import HARNESS_TASK_DIR, HARNESS_TASKS


@cache
def harness_exact_match_options() -> dict:
    """The exact_match options of the harness's triviaqa task (ignore_case, ignore_punctuation, ...)."""
    config = load_yaml(HARNESS_TASK_DIR / HARNESS_TASKS["triviaqa"].yaml, resolve_func=False)
    [entry] = [m for m in config["metric_list"] if m["metric"] == "exact_match"]
    return {k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better")}


def exact_match(prediction: str, aliases: list[str]) -> float:
    """1.0 if the stripped prediction equals any alias after the harness's normalisation, else 0.0."""
    prediction = prediction.strip()
    score = exact_match_hf_evaluate(
        predictions=[prediction] * len(aliases), references=list(aliases), **harness_exact_match_options()
    )["exact_match"]
    return 1.0 if score > 0 else 0.0
