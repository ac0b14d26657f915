"""Sizes a request may ask for, checked before anything is built or allocated.

The CLI checks `a3lm sample` / `a3lm infill` input here; a server checks every request the same way
(a request asking for 20 million blank tokens must cost a comparison, not memory and seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig

from a3lm.files import require_a3
from a3lm.model.modeling import A3ForCausalLM, max_positions

MAX_TEXT_CHARS = 1_000_000  # raw text per request before tokenizing (a few hundred thousand tokens)
MAX_ROWS = 256  # rows per request


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a model: positions per row (None: the model names no maximum),
    characters of text, rows."""

    positions: int | None
    text_chars: int = MAX_TEXT_CHARS
    rows: int = MAX_ROWS

    def check_positions(self, n: int, what: str) -> None:
        """`what` (e.g. "the blanks") needs n positions of a row."""
        if self.positions is not None and n > self.positions:
            raise ValueError(f"{what} need {n} tokens; the model has {self.positions} positions")

    def check_text(self, text: str, what: str = "the text") -> None:
        """Text must be UTF-8 (bytes that are not arrive from argv as surrogates) and not too long."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = text[e.start].encode("utf-8", "surrogateescape")
            raise ValueError(f"{what} is not valid UTF-8 (byte {bad!r} at character {e.start})") from None
        if len(text) > self.text_chars:
            raise ValueError(f"{what} has {len(text)} characters; at most {self.text_chars} are read")

    def check_rows(self, n: int) -> None:
        if not 1 <= n <= self.rows:
            raise ValueError(f"{n} rows asked; give between 1 and {self.rows}")


def limits_for(model: A3ForCausalLM) -> Limits:
    return Limits(positions=max_positions(model))


def limits_of_folder(path: str) -> Limits:
    """The limits of the A3 model saved at `path`, read from its config.json (no weights loaded)."""
    require_a3(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    return Limits(positions=getattr(config.text_config, "max_position_embeddings", None))
