"""a3lm: any-order, any-subset autoregressive language models (A3) on Hugging Face decoders."""

from . import groups
from .decoding import DecodingConfig
from .likelihood import LogProbs, sequence_logprobs
from .model import A3Config, A3ForCausalLM, A3Output
from .sampling import GenerationOutput, infill, sample

__all__ = [
    "A3Config", "A3ForCausalLM", "A3Output", "DecodingConfig", "GenerationOutput", "LogProbs", "groups", "infill", "sample",
    "sequence_logprobs",
]  # fmt: skip
__version__ = "0.1.0"
