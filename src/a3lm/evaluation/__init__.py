"""Evaluation of A3 models: the DiffuLLaMA protocol, an lm-evaluation-harness adapter, generative perplexity.

Importing this package registers the `a3lm` (A3) and `a3lm-base` (its AR base, same conventions)
models with lm-eval (see lm_eval_adapter).
"""

from .continuations import ContinuationScore, loglikelihood, score_continuations
from .lm_eval_adapter import A3LM, BaseLM

__all__ = ["A3LM", "BaseLM", "ContinuationScore", "loglikelihood", "score_continuations"]
