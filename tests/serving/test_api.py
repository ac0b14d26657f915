"""The OpenAI-compatible API against the library: served text is the library's text, exactly."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from typer.testing import CliRunner

from a3lm.cli import app as cli_app
from a3lm.decoding.api import infill, sample
from a3lm.decoding.text import encode_with_blanks
from a3lm.model.likelihood import sequence_logprobs
from a3lm.tokenizer import encode_row

NAME = "tiny"  # the name conftest serves the model under

PROMPT = "the cat sat"


def a3(choice) -> dict:
    return choice.model_extra["a3"]


def library_sample(loaded, prompt: str, length: int, **options) -> torch.Tensor:
    """The generated ids of `sample` on one prompt (row 0), as the server configures it."""
    model, tok = loaded
    ids = torch.tensor([encode_row(tok, prompt)])
    out = sample(model, ids, length=length, eos_token_id=[tok.eos_token_id], **options)
    return out.sequences[0, ids.shape[1] :][out.attention_mask[0, ids.shape[1] :].bool()]


def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_greedy_completion_is_the_library_sample(client, loaded):
    res = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    want = library_sample(loaded, PROMPT, 12, temperature=0.0)
    choice = res.choices[0]
    assert a3(choice)["token_ids"] == want.tolist()
    assert choice.text == loaded[1].decode(want.tolist(), skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if loaded[1].eos_token_id in want.tolist() else "length")
    assert res.usage.completion_tokens == len(want)


def test_seeded_completion_is_the_library_sample(client, loaded):
    kwargs = {"model": NAME, "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 2}
    extra = {"order": "random", "group_size": 2, "ignore_eos": True}
    first = client.completions.create(**kwargs, extra_body=extra)
    again = client.completions.create(**kwargs, extra_body=extra)
    model, tok = loaded
    ids = torch.tensor([encode_row(tok, PROMPT)] * 2)
    out = sample(
        model, ids, length=10, temperature=1.0, seed=7, order="random", group_size=2, stop_at_eos=False
    )
    for b in range(2):
        assert a3(first.choices[b])["token_ids"] == out.sequences[b, ids.shape[1] :].tolist()
        assert a3(first.choices[b])["fill_steps"] == out.fill_step[b, ids.shape[1] :].tolist()
        assert a3(again.choices[b]) == a3(first.choices[b])
    assert first.choices[0].text != first.choices[1].text  # two draws, not one twice


def rebuild(tok, prompt_ids: list[int], choice_a3: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, group ids and target mask [1, N] of prompt + the choice's tokens under the choice's order."""
    K = len(prompt_ids)
    N = max(choice_a3["positions"]) + 1
    ids = torch.zeros(1, N, dtype=torch.long)
    groups = torch.full((1, N), -1)
    ids[0, :K], groups[0, :K] = torch.tensor(prompt_ids), torch.arange(K)
    cols = torch.tensor(choice_a3["positions"])
    ids[0, cols] = torch.tensor(choice_a3["token_ids"])
    groups[0, cols] = K + torch.tensor(choice_a3["fill_order"])
    return ids, groups, groups >= K


@pytest.mark.parametrize(
    "extra",
    [
        {"order": "random", "group_size": 3},
        {"dynamic": True, "criterion": "margin", "per_step": 2},
        {"speculative": 3, "order": "right-to-left"},
    ],
)
def test_logprobs_are_sequence_logprobs_under_the_fill_order(client, loaded, extra):
    model, tok = loaded
    res = client.completions.create(
        model=NAME,
        prompt=PROMPT,
        max_tokens=9,
        temperature=1.0,
        seed=3,
        logprobs=2,
        extra_body={**extra, "ignore_eos": True},
    )
    choice = res.choices[0]
    ids, groups, targets = rebuild(tok, encode_row(tok, PROMPT), a3(choice))
    want = sequence_logprobs(model, ids, groups, target_mask=targets)
    got = torch.tensor(choice.logprobs.token_logprobs)
    torch.testing.assert_close(got, want.token[targets], atol=1e-4, rtol=1e-4)
    assert a3(choice)["logprob"] == pytest.approx(float(want.total[0]), abs=1e-3)
    assert all(
        len(top) == 2 and max(top.values()) >= lp - 1e-5
        for top, lp in zip(choice.logprobs.top_logprobs, got.tolist(), strict=True)
    )
    assert len(set(a3(choice)["fill_order"])) < 9 if extra.get("group_size", 1) > 1 else True


@pytest.mark.parametrize(
    "extra", [{}, {"order": "random", "group_size": 2}, {"dynamic": True}, {"speculative": 2}]
)
def test_streaming_equals_non_streaming(client, extra):
    kwargs = {
        "model": NAME,
        "prompt": PROMPT,
        "max_tokens": 14,
        "temperature": 0.8,
        "seed": 5,
        "n": 2,
        "extra_body": extra,
    }
    full = client.completions.create(**kwargs)
    texts, fills, ends = ["", ""], [{}, {}], [None, None]
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            event = a3(c)
            if event["event"] == "fill":
                fills[c.index].update(
                    zip(
                        event["positions"],
                        zip(event["token_ids"], event["logprobs"], strict=True),
                        strict=True,
                    )
                )
            elif event["event"] == "end":
                ends[c.index] = (event, c.finish_reason)
    for i, choice in enumerate(full.choices):
        assert texts[i] == choice.text
        assert ends[i] == ({**a3(choice)}, choice.finish_reason)
        final = a3(choice)
        streamed = [fills[i][p] for p in final["positions"]]  # every kept token was streamed, in its step
        assert [t for t, _ in streamed] == final["token_ids"]
        torch.testing.assert_close(
            torch.tensor([lp for _, lp in streamed]),
            torch.tensor(final["token_logprobs"]),
            atol=1e-4,
            rtol=1e-4,
        )


def test_suffix_is_a3lm_infill(client, loaded, model_dir):
    model, tok = loaded
    prompt, suffix = "the cat ", " on the mat."
    res = client.completions.create(
        model=NAME,
        prompt=prompt,
        suffix=suffix,
        max_tokens=6,
        temperature=0,
        extra_body={"order": "random", "group_size": 2, "seed": 0},
    )
    cli = CliRunner().invoke(
        cli_app,
        [
            "infill",
            "--model",
            model_dir,
            "--text",
            f"{prompt}[BLANK:6]{suffix}",
            "--temperature",
            "0",
            "--order",
            "random",
            "--group-size",
            "2",
            "--seed",
            "0",
        ],
    )
    assert cli.exit_code == 0, cli.output
    ids, known = encode_with_blanks(tok, f"{prompt}[BLANK:6]{suffix}")
    choice = a3(res.choices[0])
    ids[0, choice["positions"]] = torch.tensor(choice["token_ids"])
    assert tok.decode(ids[0].tolist(), skip_special_tokens=True) == cli.stdout.strip()
    assert res.choices[0].text == tok.decode(choice["token_ids"], skip_special_tokens=True)
    out = infill(
        model,
        *encode_with_blanks(tok, f"{prompt}[BLANK:6]{suffix}"),
        temperature=0.0,
        order="random",
        group_size=2,
        seed=0,
    )
    assert choice["token_ids"] == out.sequences[0, ~known[0]].tolist()


def test_blanks_fill_every_mark(client, loaded):
    model, tok = loaded
    text = "the [BLANK:3] sat on [BLANK:2] mat."
    res = client.completions.create(
        model=NAME, prompt=text, temperature=0, extra_body={"blanks": True, "dynamic": True}
    )
    out = infill(model, *encode_with_blanks(tok, text), temperature=0.0, dynamic=True)
    assert res.choices[0].text == tok.decode(out.sequences[0].tolist(), skip_special_tokens=True)
    assert len(a3(res.choices[0])["token_ids"]) == 5


def test_chat_uses_the_template(client, loaded):
    model, tok = loaded
    messages = [{"role": "user", "content": "the dog ran"}]
    res = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=1
    )
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = library_sample(loaded, text, 8, temperature=0.0)
    assert res.choices[0].message.content == tok.decode(want.tolist(), skip_special_tokens=True)
    assert a3(res.choices[0])["token_ids"] == want.tolist()
    assert len(res.choices[0].logprobs.content) == len(want)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == res.choices[0].message.content


def test_stop_string_cuts_text(client):
    full = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=NAME,
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stop=[stop],
            stream=True,
            extra_body={"ignore_eos": True},
        )
        if c.choices
    )
    assert streamed == cut.choices[0].text


def test_sixteen_concurrent_clients_share_decoding_calls(client, loaded, server):
    engine = server[1].state.server.engine
    prompts = [f"the {w} {v}" for w in ("cat", "dog", "mat", "big") for v in ("sat", "ran", "is", "on")]
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        barrier.wait()
        res = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=10, temperature=0, seed=i)
        results[i] = a3(res.choices[0])["token_ids"]

    calls = engine.calls
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(16))
    for i, p in enumerate(prompts):
        assert results[i] == library_sample(loaded, p, 10, temperature=0.0).tolist()
    assert engine.calls - calls < 16  # greedy requests of any seed were batched


def test_disconnect_frees_the_row(client, server):
    """A streaming client that reads the first filled tokens and leaves (its socket closed): its call
    stops."""
    engine = server[1].state.server.engine
    cancelled = engine.cancelled_calls
    body = json.dumps(
        {"model": NAME, "prompt": PROMPT, "max_tokens": 100, "stream": True, "ignore_eos": True, "seed": 1}
    ).encode()
    host, port = server[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = sock.recv(4096)
        while b'"event": "fill"' not in head:  # decoding has begun
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200")
    deadline = time.time() + 20
    while engine.cancelled_calls == cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert engine.cancelled_calls == cancelled + 1, (engine.calls, engine.pending, engine.running)
    assert client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=2, temperature=0
    ).choices  # still serving


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"model": "tiny", "prompt": ', 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (json.dumps({"model": "tiny", "prompt": "a", "colour": 1}).encode(), 400, "unknown field 'colour'"),
        (
            json.dumps({"model": "tiny", "prompt": "a", "temperature": 3}).encode(),
            400,
            "temperature: Input should be less than or equal to 2",
        ),
        (
            json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 0}).encode(),
            400,
            "max_tokens: Input should be greater than or equal to 1",
        ),
        (
            json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 101}).encode(),
            400,
            "max_tokens: at most 100",
        ),
        (json.dumps({"model": "tiny", "prompt": "a", "n": 5}).encode(), 400, "n: at most 4 choices"),
        (
            json.dumps({"model": "tiny", "prompt": "the cat " * 40, "max_tokens": 60}).encode(),
            400,
            "exceed the model's maximum of 128 positions",
        ),
        (
            json.dumps({"model": "tiny", "prompt": "the cat " * 70}).encode(),
            400,
            "this server takes at most 120",
        ),
        (
            json.dumps({"model": "gpt-4", "prompt": "a"}).encode(),
            404,
            "model 'gpt-4' not found; this server serves 'tiny'",
        ),
        (json.dumps({"prompt": "a"}).encode(), 400, "missing required field 'model'"),
        (
            json.dumps({"model": "tiny", "prompt": "a", "criterion": "margin"}).encode(),
            400,
            "apply to dynamic decoding only",
        ),
        (
            json.dumps({"model": "tiny", "prompt": "a", "order": "sideways"}).encode(),
            400,
            "unknown order 'sideways'",
        ),
        (
            json.dumps({"model": "tiny", "prompt": "a [BLANK:x] b", "blanks": True}).encode(),
            400,
            "cannot parse blank spec",
        ),
        (
            json.dumps({"model": "tiny", "prompt": "a", "x": "y" * 70000}).encode(),
            413,
            "exceeds the limit of 65536 bytes",
        ),
    ],
)
def test_bad_requests_are_openai_errors(server, body, status, message):
    code, reply = post(f"{server[0]}/v1/completions", body)
    assert code == status
    assert message in reply["error"]["message"] and reply["error"]["type"]
    assert "\n" not in reply["error"]["message"]


def test_openai_client_sees_the_errors(client):
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError, match="unknown field 'colour'"):
        client.completions.create(model=NAME, prompt="a", extra_body={"colour": 1})
    with pytest.raises(openai.BadRequestError, match="exceed the model's maximum"):
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "the cat " * 30}], max_tokens=80
        )
