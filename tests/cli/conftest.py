"""Tiny saved models with a word-level tokenizer, for the tests of the `a3lm` commands."""

from pathlib import Path

import pytest

from a3lm.model.debug import tiny_a3_model, tiny_base_model
from a3lm.tokenizer import word_tokenizer

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", ".", "a", "big"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny A3 model with 24 positions and a word-level tokenizer."""
    path = tmp_path_factory.mktemp("a3")
    tokenizer = word_tokenizer(WORDS)
    tiny_a3_model("llama", vocab_size=len(tokenizer), max_position_embeddings=24).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny plain Llama (not A3) with the same tokenizer."""
    path = tmp_path_factory.mktemp("base")
    tokenizer = word_tokenizer(WORDS)
    tiny_base_model("llama", seed=0, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
