"""`python -m a3lm.evaluation ARGS`: the `lm_eval` command with the `a3lm` model registered.

lm-eval 0.4.13 looks models up in its own registry only (no plugin entry points), so plain `lm_eval
--model a3lm` cannot see a model defined outside it; this runs the same CLI after importing ours.
"""

from lm_eval.__main__ import cli_evaluate

from . import lm_eval_adapter  # noqa: F401  (registers "a3lm")

if __name__ == "__main__":
    cli_evaluate()
