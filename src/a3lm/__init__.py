"""a3lm: any-order, any-subset autoregressive language models (A3) on Hugging Face decoders."""

from a3lm import groups
from a3lm.decoding.api import infill, sample
from a3lm.decoding.canvas import GenerationOutput
from a3lm.decoding.config import DecodingConfig
from a3lm.decoding.generation import A3GenerateOutput  # registers A3ForCausalLM.generate (HF generate() API)
from a3lm.model.config import A3Config
from a3lm.model.likelihood import LogProbs, sequence_logprobs
from a3lm.model.modeling import A3ForCausalLM, A3Output
from a3lm.training.config import TrainConfig
from a3lm.training.run import train

__all__ = [
    "A3Config",
    "A3ForCausalLM",
    "A3GenerateOutput",
    "A3Output",
    "DecodingConfig",
    "GenerationOutput",
    "LogProbs",
    "TrainConfig",
    "groups",
    "infill",
    "sample",
    "sequence_logprobs",
    "train",
]
__version__ = "0.1.0"
