"""a3lm: any-order, any-subset autoregressive language models (A3) on Hugging Face decoders."""

from . import groups
from .likelihood import LogProbs, sequence_logprobs
from .model import A3Config, A3ForCausalLM, A3Output

__all__ = ["A3Config", "A3ForCausalLM", "A3Output", "LogProbs", "groups", "sequence_logprobs"]
__version__ = "0.1.0"
