"""`a3lm serve`: an OpenAI-compatible HTTP server for an A3 model, and the page that shows the fill order.

    GET  /                       the page (static; it calls the API below)
    GET  /v1/models              the one model served
    POST /v1/completions         prompt, suffix (infilling), the A3 options; stream = server-sent events
    POST /v1/chat/completions    messages through the tokenizer's chat template

Every choice carries `a3`: its generated tokens in position order with their fill step, fill order (group
rank: the factorization) and exact log-probs under that order. A streamed choice's chunks carry `a3`
events: "start" (the canvas: each position's text, null for a blank), "fill" (the positions one step
filled, their tokens and log-probs) and "end" (the whole choice as above); their `text` deltas are the
choice's text up to its first unfilled position, so they concatenate to the final text in any order.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from transformers import PreTrainedTokenizerBase

from a3lm.decoding.api import load_pretrained
from a3lm.decoding.config import DecodingConfig
from a3lm.decoding.text import encode_with_blanks
from a3lm.model.modeling import A3ForCausalLM, max_positions
from a3lm.serving.engine import Engine, Job, RowResult, ServerLimits
from a3lm.serving.schemas import A3Options, APIError, ChatRequest, CompletionRequest, parse_request
from a3lm.serving.text import piece, remaining
from a3lm.tokenizer import encode_row

PAGE = Path(__file__).parent / "page"
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for completions


class Server:
    """What the routes need: the model, its tokenizer, its name, the limits and the decoding engine."""

    def __init__(
        self, model: A3ForCausalLM, tokenizer: PreTrainedTokenizerBase, name: str, limits: ServerLimits
    ):
        self.model, self.tokenizer, self.name, self.limits = model, tokenizer, name, limits
        self.max_positions = max_positions(model)
        self.engine = Engine(model, tokenizer, limits)
        model_eos = getattr(model.config.text_config, "eos_token_id", None)
        model_eos = (
            [] if model_eos is None else [model_eos] if isinstance(model_eos, int) else list(model_eos)
        )
        tok_eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.eos_ids = sorted({*tok_eos, *model_eos})

    # -- requests -> jobs --------------------------------------------------------------------------

    def config(self, req: A3Options) -> DecodingConfig:
        """The request's DecodingConfig; an option the mode does not take is a 400 with its message."""
        if req.model != self.name:
            raise APIError(
                404,
                f"model {req.model!r} not found; this server serves {self.name!r}",
                "model",
                "model_not_found",
            )
        if req.n > self.limits.max_n:
            raise APIError(400, f"n: at most {self.limits.max_n} choices per request (got {req.n})", "n")
        order = req.order if isinstance(req.order, str) else torch.tensor(req.order)
        try:
            return DecodingConfig(
                order=order,
                group_size=req.group_size,
                dynamic=req.dynamic,
                criterion=req.criterion,
                per_step=req.per_step,
                threshold=req.threshold,
                speculative=req.speculative,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                stop_at_eos=not req.ignore_eos,
                eos_token_id=self.eos_ids or None,
            )
        except (ValueError, TypeError) as err:
            raise APIError(400, str(err)) from None

    def check_length(self, n_prompt: int, n_new: int) -> None:
        if n_prompt > self.limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {n_prompt} tokens; "
                f"this server takes at most {self.limits.max_prompt_tokens}",
                "prompt",
            )
        if n_new > self.limits.max_tokens:
            raise APIError(400, f"max_tokens: at most {self.limits.max_tokens} (got {n_new})", "max_tokens")
        if self.max_positions is not None and n_prompt + n_new > self.max_positions:
            raise APIError(
                400,
                f"the prompt ({n_prompt} tokens) + max_tokens ({n_new}) = {n_prompt + n_new} tokens exceed "
                f"the model's maximum of {self.max_positions} positions",
                "max_tokens",
            )

    def completion_job(self, req: CompletionRequest) -> Job:
        cfg = self.config(req)
        common = {
            "n": req.n,
            "config": cfg,
            "loop": asyncio.get_running_loop(),
            "stream": req.stream,
            "top_logprobs": req.logprobs,
            "stops": req.stop,
        }
        if req.blanks or req.suffix is not None:
            text = req.prompt if req.blanks else self._suffix_text(req)
            try:
                ids_1N, known_1N = encode_with_blanks(self.tokenizer, text)
            except ValueError as err:
                raise APIError(400, str(err), "prompt") from None
            n_blank = int((~known_1N).sum())
            if req.blanks and req.max_tokens is not None and req.max_tokens != n_blank:
                raise APIError(
                    400,
                    f"max_tokens ({req.max_tokens}) differs from the {n_blank} tokens of the [BLANK:n] marks",
                    "max_tokens",
                )
            self.check_length(int(known_1N.sum()), n_blank)
            return Job(
                "infill", ids_1N[0].tolist(), known_1N[0].tolist(), n_blank, whole_text=req.blanks, **common
            )
        ids = encode_row(self.tokenizer, req.prompt)
        length = req.max_tokens or DEFAULT_COMPLETION_TOKENS
        self.check_length(len(ids), length)
        return Job("sample", ids, None, length, **common)

    def _suffix_text(self, req: CompletionRequest) -> str:
        if "[BLANK" in req.prompt or "[BLANK" in (req.suffix or ""):
            raise APIError(
                400,
                "prompt and suffix hold a [BLANK mark: "
                "to fill [BLANK:n] marks, send blanks=true and no suffix",
                "prompt",
            )
        return f"{req.prompt}[BLANK:{req.max_tokens or DEFAULT_COMPLETION_TOKENS}]{req.suffix}"

    def chat_job(self, req: ChatRequest) -> Job:
        cfg = self.config(req)
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "the model's tokenizer has no chat template: use /v1/completions", "messages")
        messages = [m.model_dump() for m in req.messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token):
            text = text[len(self.tokenizer.bos_token) :]  # the row start is put in front once, by encode_row
        ids = encode_row(self.tokenizer, text)
        room = self.limits.max_tokens if self.max_positions is None else self.max_positions - len(ids)
        length = req.max_completion_tokens or req.max_tokens or max(1, min(self.limits.max_tokens, room))
        self.check_length(len(ids), length)
        return Job(
            "sample",
            ids,
            None,
            length,
            req.n,
            cfg,
            asyncio.get_running_loop(),
            stream=req.stream,
            top_logprobs=req.top_logprobs if req.logprobs else None,
            stops=req.stop,
        )

    # -- jobs -> responses -------------------------------------------------------------------------

    def canvas(self, job: Job) -> list[str | None]:
        """Each position's text for the page: the known tokens' pieces, None at a blank."""
        known = job.known or [True] * len(job.ids) + [False] * job.length
        ids = job.ids + [0] * (len(known) - len(job.ids))
        return [piece(self.tokenizer, i) if k else None for i, k in zip(ids, known, strict=True)]


def a3_fields(row: RowResult) -> dict:
    return {
        "event": "end",
        "token_ids": row.token_ids,
        "positions": row.positions,
        "fill_steps": row.fill_steps,
        "fill_order": row.fill_order,
        "token_logprobs": row.logprobs,
        "logprob": sum(row.logprobs),
    }


def completion_logprobs(tokenizer, row: RowResult) -> dict:
    tokens = [piece(tokenizer, i) for i in row.token_ids]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {
        "tokens": tokens,
        "token_logprobs": row.logprobs,
        "top_logprobs": row.top_logprobs,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, row: RowResult) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    tops = row.top_logprobs or [{} for _ in row.token_ids]
    return {
        "content": [
            {**entry(piece(tokenizer, i), lp), "top_logprobs": [entry(t, v) for t, v in top.items()]}
            for i, lp, top in zip(row.token_ids, row.logprobs, tops, strict=True)
        ]
    }


async def wait_result(job: Job, request: Request, engine: Engine) -> list[RowResult]:
    """The job's rows; a client gone meanwhile cancels the job (its rows are freed)."""
    engine.submit(job)
    try:
        while True:
            kind, payload = await next_event(job, request)
            if kind == "error":
                raise payload
            if kind == "done":
                return payload
    finally:
        job.cancelled = True  # a no-op once done


async def read_json(request: Request, limit: int) -> object:
    """The body as JSON, refused (413) past `limit` bytes before it is read whole; malformed: 400."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body ({declared} bytes) exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"malformed JSON in the request body: {err}") from None


def sse(data: object) -> str:
    return f"data: {json.dumps(data)}\n\n"


def usage(job: Job, rows: list[RowResult]) -> dict:
    prompt = int(sum(job.known)) if job.known else len(job.ids)
    completion = sum(len(r.token_ids) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def next_event(job: Job, request: Request) -> tuple[str, object]:
    """The job's next event; a client gone meanwhile (uvicorn does not fail the writes) cancels the job."""
    while True:
        if await request.is_disconnected():
            raise APIError(499, "the client disconnected")
        try:
            return await asyncio.wait_for(job.events.get(), 0.2)
        except TimeoutError:
            continue


async def stream_events(server: Server, job: Job, request: Request, chat: bool) -> AsyncIterator[str]:
    """Server-sent events of a streamed job; the client leaving cancels the job (frees its rows)."""
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": server.name,
        "object": "chat.completion.chunk" if chat else "text_completion",
    }
    sent = [""] * job.n

    def choice(
        index: int, text: str, a3: dict, finish: str | None = None, logprobs: dict | None = None
    ) -> dict:
        body = {"delta": {"content": text}} if chat else {"text": text}
        return {"index": index, **body, "logprobs": logprobs, "finish_reason": finish, "a3": a3}

    try:
        start = {"event": "start", "canvas": server.canvas(job)}
        first = [
            choice(i, "", start) | ({"delta": {"role": "assistant", "content": ""}} if chat else {})
            for i in range(job.n)
        ]
        yield sse({**head, "choices": first})
        while True:
            kind, payload = await next_event(job, request)
            if kind == "error":
                yield sse(payload.body())
                break
            if kind == "step":
                for fill in payload:
                    sent[fill["index"]] += fill["text"]
                    a3 = {"event": "fill", **{k: v for k, v in fill.items() if k not in ("index", "text")}}
                    yield sse({**head, "choices": [choice(fill["index"], fill["text"], a3)]})
                continue
            for i, row in enumerate(payload):
                logprobs = None
                if job.top_logprobs is not None:
                    logprobs = (chat_logprobs if chat else completion_logprobs)(server.tokenizer, row)
                yield sse(
                    {
                        **head,
                        "choices": [
                            choice(
                                i, remaining(row.text, sent[i]), a3_fields(row), row.finish_reason, logprobs
                            )
                        ],
                    }
                )
            yield sse({**head, "choices": [], "usage": usage(job, payload)})
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True


def create_app(
    model: A3ForCausalLM, tokenizer: PreTrainedTokenizerBase, name: str, limits: ServerLimits | None = None
) -> FastAPI:
    """The FastAPI app serving `model` as `name`; its lifespan starts and stops the decoding worker."""
    server = Server(model, tokenizer, name, limits or ServerLimits())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="a3lm", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html")

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "a3lm",
                    "max_model_len": server.max_positions,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_request(CompletionRequest, await read_json(request, server.limits.max_body_bytes))
        job = server.completion_job(req)
        return await respond(request, job, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_request(ChatRequest, await read_json(request, server.limits.max_body_bytes))
        job = server.chat_job(req)
        return await respond(request, job, chat=True)

    async def respond(request: Request, job: Job, chat: bool):
        if job.stream:
            server.engine.submit(job)
            return StreamingResponse(
                stream_events(server, job, request, chat), media_type="text/event-stream"
            )
        rows = await wait_result(job, request, server.engine)
        choices = []
        for i, row in enumerate(rows):
            logprobs = None
            if job.top_logprobs is not None:
                logprobs = (chat_logprobs if chat else completion_logprobs)(server.tokenizer, row)
            body = {"message": {"role": "assistant", "content": row.text}} if chat else {"text": row.text}
            choices.append(
                {
                    "index": i,
                    **body,
                    "logprobs": logprobs,
                    "finish_reason": row.finish_reason,
                    "a3": a3_fields(row),
                }
            )
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": usage(job, rows),
        }

    return app


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    limits: ServerLimits | None = None,
    graceful_s: int = 5,
) -> None:
    """Load the A3 checkpoint and serve it until SIGINT / SIGTERM (in-flight requests get
    `graceful_s` seconds to finish, then are cancelled; the process exits with status 0)."""
    import uvicorn

    model, tokenizer = load_pretrained(model_dir)
    app = create_app(model, tokenizer, name or Path(model_dir).resolve().name, limits)
    # uvicorn re-raises the signal it stopped on once it is done: handlers that return make that a clean exit
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=graceful_s, log_level="info")
