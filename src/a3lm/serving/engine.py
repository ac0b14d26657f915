"""The decoding worker: a bounded queue of jobs, batched into shared `sample` / `infill` calls.

One thread decodes. It takes the oldest waiting job, waits `batch_wait_s` for company, and runs every
waiting job that can share its call as rows of one batch (a job of n choices is n rows). Jobs share a call
when the call gives each of them what it would give it alone:

- greedy decoding in a fixed order (left-to-right, right-to-left; any mode but the random criterion)
  makes each row's tokens independent of its batch, so such jobs share calls whatever their seeds;
- unseeded sampling is nondeterministic anyway: such jobs share calls with their like;
- a seeded job that draws anything (tokens, a random order, random criterion scores) runs alone, so that
  its output is the library's `sample(..., seed=seed)` / `infill(..., seed=seed)` exactly.

Continuations share a call only with the same max_tokens (`sample` takes one length; in any order other
than left to right a longer canvas is a different generation); infillings of any lengths share one.
Every step the step hook streams each row's new tokens and frees the rows of cancelled jobs (a freed row
is no longer filled; when every job of a call is gone the call stops). After decoding, one forward scores
the result under the order it was generated in: the exact log-probabilities.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from a3lm.decoding.api import infill, sample
from a3lm.decoding.config import DecodingConfig
from a3lm.decoding.text import cut_at_stop
from a3lm.model.modeling import A3ForCausalLM
from a3lm.serving.schemas import APIError
from a3lm.serving.text import TextStream, piece


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask, and how much the server holds at once."""

    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    max_n: int = 16
    max_body_bytes: int = 1 << 20
    max_queue: int = 256
    max_batch_rows: int = 64
    batch_wait_s: float = 0.005


@dataclass
class RowResult:
    """One choice: the generated tokens in position order, with their fill step and order (the group rank
    among generated tokens: the factorization), exact log-probs, text and why it ended."""

    text: str
    token_ids: list[int]
    positions: list[int]
    fill_steps: list[int]
    fill_order: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    finish_reason: str


@dataclass(eq=False)
class Job:
    """One request: n rows of a continuation (kind "sample": ids = prompt) or an infilling ("infill":
    ids = canvas, known = its known tokens). whole_text: the choice's text is the whole canvas ([BLANK:n]
    marks), else the generated tokens alone."""

    kind: str
    ids: list[int]
    known: list[bool] | None
    length: int
    n: int
    config: DecodingConfig
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    top_logprobs: int | None = None
    stops: list[str] | None = None
    whole_text: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def emit(self, kind: str, payload: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def batch_key(self) -> tuple:
        cfg = self.config
        drawn = (
            cfg.temperature > 0
            or cfg.order in ("random", "random-blocks")
            or (cfg.dynamic and cfg.criterion == "random")
        )
        if not isinstance(cfg.order, str) or (drawn and cfg.seed is not None):
            return ("alone", id(self))
        shared = dataclasses.replace(cfg, seed=None)
        return (self.kind, self.length if self.kind == "sample" else 0, shared)


class Cancelled(Exception):
    """Every job of a running call is gone."""


class Engine:
    """The queue and its worker thread; `submit` from the event loop, results come back as job events."""

    def __init__(self, model: A3ForCausalLM, tokenizer: PreTrainedTokenizerBase, limits: ServerLimits):
        self.model, self.tokenizer, self.limits = model, tokenizer, limits
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.running: list[Job] = []
        self.calls = 0  # decoding calls made (tests read how many jobs shared one)
        self.cancelled_calls = 0  # calls stopped because every one of their jobs was gone
        self.thread = threading.Thread(target=self._work, name="a3lm-decode", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise APIError(503, "the server is shutting down")
            if len(self.pending) >= self.limits.max_queue:
                raise APIError(
                    429, f"the server is busy: {len(self.pending)} requests are waiting; retry later"
                )
            self.pending.append(job)
            self.cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, fail the waiting ones, cancel the running call and join the worker."""
        with self.cond:
            self.stopping = True
            waiting, self.pending = list(self.pending), deque()
            for job in self.running:
                job.cancelled = True
            self.cond.notify_all()
        for job in waiting:
            job.emit("error", APIError(503, "the server is shutting down"))
        self.thread.join(timeout)

    # -- the worker --------------------------------------------------------------------------------

    def _work(self) -> None:
        while (jobs := self._next_batch()) is not None:
            if not jobs:
                continue
            try:
                results = self._decode(jobs)
            except Cancelled:
                self.cancelled_calls += 1
                results = None
            except Exception as err:  # a request the library refuses: its message, one line
                message = str(err).splitlines()[0] if str(err) else type(err).__name__
                status = 400 if isinstance(err, ValueError | TypeError) else 500
                for job in jobs:
                    job.emit("error", APIError(status, message))
                results = None
            finally:
                with self.cond:
                    self.running = []
            if results is not None:
                for job, rows in results:
                    job.emit("done", rows)

    def _next_batch(self) -> list[Job] | None:
        """The oldest live job and every waiting job that may share its call (None: stop)."""
        with self.cond:
            while not self.pending and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
        time.sleep(self.limits.batch_wait_s)  # let concurrent requests arrive
        with self.cond:
            live = [job for job in self.pending if not job.cancelled]
            if not live:
                self.pending.clear()
                return []
            key, rows, batch = live[0].batch_key(), 0, []
            for job in live:
                if job.batch_key() == key and rows + job.n <= max(self.limits.max_batch_rows, live[0].n):
                    batch.append(job)
                    rows += job.n
            self.pending = deque(job for job in live if job not in batch)
            self.running = batch
            self.calls += 1
            return batch

    @torch.inference_mode()
    def _decode(self, jobs: list[Job]) -> list[tuple[Job, list[RowResult]]]:
        rows = [job for job in jobs for _ in range(job.n)]
        ids_BL, real_BL, known_BL = _pack(rows, self._pad_id())
        hook = _StepHook(self, rows)
        cfg = jobs[0].config
        if jobs[0].kind == "sample":
            out = sample(self.model, ids_BL, real_BL, length=jobs[0].length, config=cfg, on_step=hook)
        else:
            out = infill(self.model, ids_BL, known_BL, real_BL, config=cfg, on_step=hook)
        whole = out.untruncated or out
        logits_BNV = self.model(
            input_ids=whole.sequences,
            group_ids=whole.group_ids,
            attention_mask=whole.attention_mask,
            position_ids=whole.position_ids,
        ).logits
        results, r = [], 0
        for job in jobs:
            results.append((job, [self._row(job, out, logits_BNV, b) for b in range(r, r + job.n)]))
            r += job.n
        return results

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def _row(self, job: Job, out, logits_BNV: torch.Tensor, b: int) -> RowResult:
        """Row b of the output as a choice: its generated tokens, their exact log-probs, its text."""
        real_N = out.attention_mask[b].bool()
        gen_N = real_N & (out.fill_step[b] >= 1)
        cols = gen_N.nonzero().squeeze(-1)
        logp_GV = torch.log_softmax(logits_BNV[b, cols].float(), dim=-1)
        token_ids = out.sequences[b, cols]
        logprobs = logp_GV.gather(-1, token_ids[:, None]).squeeze(-1)
        n_known = int((real_N & (out.fill_step[b] == 0)).sum())
        top = None
        if job.top_logprobs:
            values, ids = logp_GV.topk(job.top_logprobs, dim=-1)
            top = [
                {piece(self.tokenizer, i): v for i, v in zip(row_i, row_v, strict=True)}
                for row_i, row_v in zip(ids.tolist(), values.tolist(), strict=True)
            ]
        shown = out.sequences[b, real_N if job.whole_text else gen_N].tolist()
        text = self.tokenizer.decode(shown, skip_special_tokens=True)
        eos = job.kind == "sample" and any(i in _eos_list(job.config) for i in token_ids.tolist())
        text, stopped = cut_at_stop(text, job.stops)
        return RowResult(
            text=text,
            token_ids=token_ids.tolist(),
            positions=cols.tolist(),
            fill_steps=out.fill_step[b, cols].tolist(),
            fill_order=(out.group_ids[b, cols] - n_known).tolist(),
            logprobs=logprobs.tolist(),
            top_logprobs=top,
            finish_reason="stop" if eos or stopped else "length",
        )


def _eos_list(cfg: DecodingConfig) -> list[int]:
    if not cfg.stop_at_eos or cfg.eos_token_id is None:
        return []
    return [cfg.eos_token_id] if isinstance(cfg.eos_token_id, int) else list(cfg.eos_token_id)


def _pack(rows: list[Job], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' ids, real and known masks [B, L], right-padded."""
    L = max(len(job.ids) for job in rows)
    ids_BL = torch.full((len(rows), L), pad_id, dtype=torch.long)
    real_BL = torch.zeros(len(rows), L, dtype=torch.long)
    known_BL = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, job in enumerate(rows):
        n = len(job.ids)
        ids_BL[b, :n] = torch.tensor(job.ids)
        real_BL[b, :n] = 1
        known_BL[b, :n] = True if job.known is None else torch.tensor(job.known)
    return ids_BL, real_BL, known_BL


class _StepHook:
    """After every step: free the rows of cancelled jobs, stream each streaming row's new tokens (position,
    token, its exact log-prob: the step scored it given everything committed before) and text."""

    def __init__(self, engine: Engine, rows: list[Job]):
        self.engine, self.rows = engine, rows
        self.jobs = list(dict.fromkeys(rows))
        self.seen_BN: torch.Tensor | None = None
        self.texts = [TextStream(job.stops) for job in rows]

    def __call__(self, canvas, step: int, step_logits) -> None:
        if all(job.cancelled for job in self.jobs):
            raise Cancelled
        gone = torch.tensor([job.cancelled for job in self.rows], device=canvas.finished.device)
        canvas.finished |= gone
        if not any(job.stream and not job.cancelled for job in self.jobs):
            return
        logp_BN = _committed_logprobs(canvas.ids, step_logits.positions_BQ, step_logits.logits_BQV)
        seen = self.seen_BN if self.seen_BN is not None else canvas.known
        new_BN = canvas.filled & ~seen & ~gone[:, None]
        self.seen_BN = canvas.filled.clone()
        new, ids, logp = new_BN.cpu(), canvas.ids.cpu(), logp_BN.cpu()
        shown = (canvas.filled & ~canvas.after_eos).cpu()
        r = 0
        for job in self.jobs:
            if job.stream and not job.cancelled:
                job.emit(
                    "step",
                    [
                        self._fills(job, b - r, b, step, new[b], ids[b], logp[b], shown[b])
                        for b in range(r, r + job.n)
                    ],
                )
            r += job.n

    def _fills(self, job: Job, index: int, b: int, step: int, new_N, ids_N, logp_N, shown_N) -> dict:
        cols = new_N.nonzero().squeeze(-1)
        tok = self.engine.tokenizer
        token_ids = ids_N[cols].tolist()
        start = 0 if job.whole_text else len(job.ids) if job.kind == "sample" else None
        delta = self.texts[b].update(_prefix_text(tok, job, ids_N, shown_N, start))
        return {
            "index": index,
            "text": delta,
            "step": step,
            "positions": cols.tolist(),
            "token_ids": token_ids,
            "tokens": [piece(tok, i) for i in token_ids],
            "logprobs": logp_N[cols].tolist(),
        }


def _prefix_text(tokenizer, job: Job, ids_N: torch.Tensor, shown_N: torch.Tensor, start: int | None) -> str:
    """The text of the choice's tokens up to its first unfilled position (and its first EOS)."""
    if start is None:  # a suffix infilling: the blank's tokens
        cols = [c for c, k in enumerate(job.known) if not k]
        start, end = cols[0], cols[-1] + 1
    else:
        end = len(job.ids) + job.length if job.kind == "sample" else len(job.ids)
    span = shown_N[start:end].tolist()
    stop = span.index(False) if False in span else len(span)
    ids = ids_N[start : start + stop].tolist()
    eos = _eos_list(job.config)
    first_eos = next((i for i, t in enumerate(ids) if t in eos), None) if job.kind == "sample" else None
    return tokenizer.decode(ids if first_eos is None else ids[: first_eos + 1], skip_special_tokens=True)


def _committed_logprobs(
    ids_BN: torch.Tensor, positions_BQ: torch.Tensor, logits_BQV: torch.Tensor
) -> torch.Tensor:
    """[B, N]: log p of the canvas token at every column the step scored (0 elsewhere)."""
    cols_BQ = positions_BQ.clamp(min=0)
    tokens_BQ = ids_BN.gather(1, cols_BQ)
    logp_BQ = torch.log_softmax(logits_BQV.float(), dim=-1).gather(-1, tokens_BQ[..., None]).squeeze(-1)
    logp_BQ = logp_BQ.masked_fill(positions_BQ < 0, 0.0)
    return torch.zeros(ids_BN.shape, dtype=logp_BQ.dtype, device=ids_BN.device).scatter_(1, cols_BQ, logp_BQ)
