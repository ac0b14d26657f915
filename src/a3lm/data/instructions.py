"""Instruction data: chat records rendered with the tokenizer's chat template into prompt and answer
tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ChatTokens:
    """One instruction example's ids without the row start: the prompt (context) and the answer (targets)."""

    prompt: list[int]
    answer: list[int]


def chat_messages(example: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation of a record: its `messages` (the last one the assistant's answer), or a user turn
    `prompt` and an assistant turn `response` (or `completion`)."""
    messages = example.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages
        ):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} records")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's answer, after another")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt, answer = example.get("prompt"), example.get("response", example.get("completion"))
    if isinstance(prompt, str) and isinstance(answer, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    raise ValueError(
        f"{where} has neither chat 'messages' nor 'prompt' and 'response' strings; "
        f"its fields are {sorted(example)}"
    )


def render_chat(tokenizer: Any, messages: list[dict[str, str]], where: str) -> ChatTokens:
    """Prompt and answer ids of a conversation rendered by the tokenizer's chat template.

    The prompt is every message but the last, with the template's generation prompt (the assistant
    header); the answer is the rest of the full rendering, then EOS unless the template put it there.
    A leading BOS text is dropped: the loader starts every row with the row start itself.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "data.format=chat renders records with the tokenizer's chat template, and this "
            "tokenizer has none: use a tokenizer with one (model.tokenizer) or set "
            "tokenizer.chat_template"
        )
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            f"{where}: the chat template does not render the conversation as its prompt "
            "followed by the answer, so the answer's tokens cannot be told apart"
        )
    answer = full[len(prompt) :]
    if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
        prompt = prompt[len(tokenizer.bos_token) :]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    answer_ids = encode(answer)
    if tokenizer.eos_token_id not in answer_ids:  # the model learns to stop
        answer_ids.append(tokenizer.eos_token_id)
    return ChatTokens(encode(prompt), answer_ids)
