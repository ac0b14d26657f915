"""Text -> ids: the row-start convention every path shares, and the synthetic word-level tokenizer.

Every row a model sees starts with the same token: training rows, sampling prompts, infilling texts
and scored contexts. It is the tokenizer's BOS, or its EOS when it has none (Qwen2: documents end
with <|endoftext|>, so a row that starts with it reads as the start of a document). To start rows
with another token, set `tokenizer.bos_token` and save the tokenizer with the model. `row_start_id`
is the rule and `encode_row` the text -> ids path; nothing else decides whether BOS is there (some
tokenizers add it by themselves, SmolLM2's does not, so text is always encoded without special
tokens and the row start is put in front here).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def word_tokenizer(words: Iterable[str], model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then `words` in the given order (duplicates dropped).

    Text is split on whitespace and punctuation; decoding joins words with single spaces. It adds BOS
    in front of every encoded text, as Llama tokenizers do.
    """
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins word pieces with spaces
    tok.post_processor = TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL_TOKENS)


def row_start_id(tokenizer: Any) -> int:
    """The token every row starts with: BOS, else EOS (see the module docstring)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError(
            "the tokenizer has neither a BOS nor an EOS token to start rows with: set tokenizer.bos_token"
        )
    return int(token)


def encode_row(tokenizer: Any, text: str) -> list[int]:
    """[row start] + the ids of `text` without special tokens (an empty text gives the row start alone)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return [row_start_id(tokenizer), *ids]


def encode_chat(tokenizer: Any, prompt: str) -> list[int]:
    """`prompt` as one user message in the tokenizer's chat template, ready for the assistant's reply,
    starting with the row start (put in front unless the template already begins with it).
    A tokenizer without a chat template is one clear error."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template, so a prompt cannot be put in chat form: "
            "use an instruct model's "
            "tokenizer (SmolLM2-Instruct's has one) or set tokenizer.chat_template, or drop --chat"
        )
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = list(ids)
    start = row_start_id(tokenizer)
    return ids if ids[:1] == [start] else [start, *ids]
