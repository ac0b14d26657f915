"""Text in, text out: `[BLANK:n]` marks, the fill-order picture, and the CLI's sample/infill helpers."""

from __future__ import annotations

import re
import warnings

import torch
from transformers import PreTrainedTokenizerBase

from a3lm.decoding.api import infill, sample
from a3lm.decoding.canvas import GenerationOutput
from a3lm.decoding.config import DecodingConfig
from a3lm.decoding.limits import Limits, limits_for
from a3lm.model.modeling import A3ForCausalLM, max_positions
from a3lm.tokenizer import encode_chat, encode_row

# -- text helpers (CLI) ----------------------------------------------------------------------------

_BLANK = re.compile(r"\[BLANK:(\d+)\]")


def parse_blanks(text: str) -> list[str | int]:
    """Split "The cat [BLANK:8] on the mat." into text pieces and blank lengths: ["The cat ", 8, " on the
    mat."]."""
    pieces: list[str | int] = []
    start = 0
    for m in _BLANK.finditer(text):
        pieces.append(text[start : m.start()])
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"blank {m.group(0)!r} must have length >= 1")
        pieces.append(n)
        start = m.end()
    pieces.append(text[start:])
    for piece in pieces:
        if isinstance(piece, str) and "[BLANK" in piece:
            bad = piece[piece.index("[BLANK") :].split("]")[0] + "]"
            raise ValueError(f"cannot parse blank spec {bad!r}: write [BLANK:n] with n the number of tokens")
    if not any(isinstance(p, int) for p in pieces):
        raise ValueError(f"no blank in {text!r}: mark the span to fill as [BLANK:n]")
    return [p for p in pieces if p != ""]


def encode_with_blanks(
    tokenizer: PreTrainedTokenizerBase, text: str, limits: Limits | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize text with [BLANK:n] spans: input_ids [1, N] (the row start first, blanks hold pad ids)
    and known_mask [1, N] (False at blanks). `limits`: the text's size and the blanks' lengths are
    checked against them before anything is tokenized or built.

    One space just before a blank is dropped: "The cat [BLANK:8] on" must not encode "The cat " with
    a lone space token; in BPE vocabularies a word carries its leading space, so the blank's first
    token does ("The cat" [" sat" ...] " on"). Line breaks and tabs are text and stay.
    """
    ids, known = encode_row(tokenizer, ""), [True]
    filler = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    check_request(text, limits or Limits(positions=None), blanks=True)
    pieces = parse_blanks(text)
    for i, piece in enumerate(pieces):
        if isinstance(piece, int):
            ids += [filler] * piece
            known += [False] * piece
            continue
        if i + 1 < len(pieces):  # a blank follows
            piece = piece.removesuffix(" ")
        toks = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        ids += toks
        known += [True] * len(toks)
    return torch.tensor([ids]), torch.tensor([known])


def check_request(text: str, limits: Limits, blanks: bool) -> None:
    """Everything about a text request that can be checked before the model loads: UTF-8, size, and
    (blanks=True) the [BLANK:n] syntax and the blanks' total length against the model's positions."""
    limits.check_text(text, "the text" if blanks else "the prompt")
    if blanks:
        pieces = parse_blanks(text)
        limits.check_positions(sum(p for p in pieces if isinstance(p, int)), "the blanks")


def render_fill_order(tokens: list[str], fill_step: list[int], blank: str = "_") -> str:
    """A picture of the generation: one line per step, the tokens filled so far, [new ones] bracketed.

    tokens, fill_step: one entry per real position (fill_step 0 = given, t >= 1 = filled at step t).
    """
    steps = sorted({s for s in fill_step if s >= 1})
    width = len(str(steps[-1])) if steps else 1
    lines = []
    for t in [0, *steps]:
        words = [
            f"[{tok}]" if s == t > 0 else tok if 0 <= s <= t else blank
            for tok, s in zip(tokens, fill_step, strict=True)
        ]
        lines.append(f"step {t:>{width}}: " + " ".join(words))
    return "\n".join(lines)


def _piece(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """One token as text for the picture: its decoded string (repr'd when it is only whitespace)."""
    if token_id >= len(tokenizer):
        return f"<{token_id}>"
    text = tokenizer.decode([token_id])
    return text.strip() or repr(text)


def _text_and_picture(
    tokenizer: PreTrainedTokenizerBase, out: GenerationOutput, reply_only: bool = False
) -> tuple[str, str]:
    """The decoded text (special tokens left out; reply_only: the generated tokens alone) and the
    fill-order picture (one decoded piece per token, special tokens left out too; ids past the
    vocabulary, from a padded embedding, as <id>)."""
    real = out.attention_mask[0].bool()
    ids = out.sequences[0][real].tolist()
    steps = out.fill_step[0][real].tolist()
    special = set(tokenizer.all_special_ids)
    shown = [(i, s) for i, s in zip(ids, steps, strict=True) if i not in special]
    tokens = [_piece(tokenizer, i) for i, _ in shown]
    picture = render_fill_order(tokens, [s for _, s in shown])
    text_ids = [i for i, s in zip(ids, steps, strict=True) if s >= 1] if reply_only else ids
    return tokenizer.decode(text_ids, skip_special_tokens=True), picture


DEFAULT_LENGTH = 64


def warn_unknown_words(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    """Warn when words of `text` become the unknown token (a word-level vocabulary): they are lost."""
    unk = tokenizer.unk_token_id
    if unk is None or not text:
        return
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    if unk not in enc["input_ids"]:
        return
    spans = enc.get("offset_mapping") or []
    words = [text[a:b] for i, (a, b) in zip(enc["input_ids"], spans, strict=False) if i == unk]
    shown = ", ".join(repr(w) for w in dict.fromkeys(words)) if words else "some words"
    warnings.warn(f"not in the model's vocabulary, read as {tokenizer.unk_token}: {shown}", stacklevel=2)


def sample_text(
    model: A3ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    config: DecodingConfig | None = None,
    length: int | None = None,
    chat: bool = False,
    **kwargs,
) -> tuple[str, str]:
    """Continue one text prompt (keywords as in `sample`; "" = from the row start alone); returns
    (text, fill-order picture). chat: the prompt is a user message put in the tokenizer's chat
    template (`encode_chat`), and the text is the reply alone.

    length None: DEFAULT_LENGTH tokens, or fewer if the model's positions end sooner after the prompt.
    """
    limits_for(model).check_text(prompt, "the prompt")
    warn_unknown_words(tokenizer, prompt)
    input_ids = torch.tensor([encode_chat(tokenizer, prompt) if chat else encode_row(tokenizer, prompt)])
    if length is None:
        max_pos = max_positions(model)
        room = DEFAULT_LENGTH if max_pos is None else max_pos - input_ids.shape[1]
        if room < 1:
            raise ValueError(
                f"the prompt ({input_ids.shape[1]} tokens) fills the model's {max_pos} positions: nothing "
                "left to sample"
            )
        length = min(DEFAULT_LENGTH, room)
    eos_given = kwargs.get("eos_token_id") is not None or (
        config is not None and config.eos_token_id is not None
    )
    if not eos_given and tokenizer.eos_token_id is not None:  # the tokenizer's EOS, and the model's own
        model_eos = getattr(model.config.text_config, "eos_token_id", None)
        model_eos = (
            [] if model_eos is None else [model_eos] if isinstance(model_eos, int) else list(model_eos)
        )
        kwargs["eos_token_id"] = sorted({tokenizer.eos_token_id, *model_eos})
    return _text_and_picture(
        tokenizer, sample(model, input_ids, config=config, length=length, **kwargs), reply_only=chat
    )


def infill_text(
    model: A3ForCausalLM, tokenizer: PreTrainedTokenizerBase, text: str, **kwargs
) -> tuple[str, str]:
    """Fill the [BLANK:n] spans of one text (keywords as in `infill`); returns (text, fill-order picture)."""
    warn_unknown_words(tokenizer, _BLANK.sub(" ", text))
    input_ids, known = encode_with_blanks(tokenizer, text, limits_for(model))
    return _text_and_picture(tokenizer, infill(model, input_ids, known, **kwargs))


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """text up to its first stop string (not included; empty stop strings are ignored), and whether one
    was hit."""
    hits = [i for i in (text.find(s) for s in stops or [] if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)
