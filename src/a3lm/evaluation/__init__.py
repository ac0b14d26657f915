"""Evaluation of A3 models: the DiffuLLaMA protocol, an lm-evaluation-harness adapter, generative perplexity,
and held-out NLL per factorization.

Only `lm_eval_adapter`, `tasks`, `triviaqa`, `runner` (`a3lm eval`) and `__main__` need lm-eval (the `eval`
extra); `nll`, `continuations` and `genppl` run without it. Importing `lm_eval_adapter` registers the
`a3lm` (A3) and `a3lm-base` (its AR base, same conventions) models with lm-eval.
"""
