"""Text of a choice as it forms: deltas of its filled prefix, stop strings, token pieces."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from a3lm.decoding.text import cut_at_stop


def piece(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """One token as text ("" for special tokens; <id> past the vocabulary, from a padded embedding)."""
    if token_id >= len(tokenizer):
        return f"<{token_id}>"
    return tokenizer.decode([token_id], skip_special_tokens=True)


class TextStream:
    """Deltas of a growing text whose concatenation is the final text.

    update(prefix): the text of the tokens filled so far up to the first unfilled one; sends what it adds
    to what was sent, holding back an unfinished UTF-8 character and, with stop strings, the characters a
    stop string could still start in; nothing after a stop string. The rest: `remaining`.
    """

    def __init__(self, stops: list[str] | None):
        self.stops = stops or []
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = ""
        self.stopped = False

    def update(self, prefix: str) -> str:
        if self.stopped or not prefix.startswith(self.sent):
            return ""
        text, self.stopped = cut_at_stop(prefix, self.stops)
        if not self.stopped:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self.hold] if self.hold else text
        delta = text[len(self.sent) :] if len(text) > len(self.sent) else ""
        self.sent += delta
        return delta


def remaining(final: str, sent: str) -> str:
    """What completes the deltas sent so far into the final text."""
    return final[len(sent) :] if final.startswith(sent) else ""
