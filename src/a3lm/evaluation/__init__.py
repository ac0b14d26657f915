"""Evaluation of A3 models: the DiffuLLaMA protocol, an lm-evaluation-harness adapter, generative perplexity.

Importing this package registers the `a3lm` model with lm-eval (see lm_eval_adapter).
"""

from .likelihood import SCORING_ORDERS, ContinuationScore, loglikelihood, score_continuations
from .lm_eval_adapter import A3LM

__all__ = ["A3LM", "SCORING_ORDERS", "ContinuationScore", "loglikelihood", "score_continuations"]
