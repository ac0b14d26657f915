"""A tiny A3 model saved with a byte-level BPE tokenizer (and a chat template), served on loopback."""

import socket
import threading
import time

import pytest
import uvicorn

from a3lm.decoding.api import load_pretrained
from a3lm.model.debug import tiny_a3_model, tiny_bpe_tokenizer
from a3lm.serving.app import create_app
from a3lm.serving.engine import ServerLimits

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NAME = "tiny"
LIMITS = ServerLimits(
    max_tokens=100, max_prompt_tokens=120, max_n=4, max_body_bytes=64 * 1024, batch_wait_s=0.02
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("a3-bpe")
    tokenizer = tiny_bpe_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tiny_a3_model("llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id).save_pretrained(
        path
    )
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def loaded(model_dir):
    return load_pretrained(model_dir)


@pytest.fixture(scope="session")
def server(loaded):
    """(base url, app) of a server running in a thread for the whole session."""
    model, tokenizer = loaded
    app = create_app(model, tokenizer, NAME, LIMITS)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0, timeout=60)
