"""An OpenAI-compatible HTTP server on the engine: point existing tools at a local model.

    python server.py                                   # the demo model on http://127.0.0.1:8000
    python server.py --ckpt-dir ~/llama/Llama-3.1-8B-Instruct --port 8080 --api-key secret

Endpoints (the OpenAI API's names and JSON shapes, as llama.cpp's `llama-server` and vLLM serve them):
`POST /v1/completions`, `POST /v1/chat/completions` (the model's own chat format, chat_format.py),
both with `"stream": true` as server-sent events; `GET /v1/models`; `GET /health`.

How it works:

1. **One engine thread** owns the model and a `batching.ContinuousBatching` scheduler. HTTP
   handlers never touch the model: they put a `batching.Request` into the engine's inbox and wait
   for what it reports back.
2. **Concurrent requests share the running batch.** The engine thread admits every new request into
   a free row as soon as one is free, and steps all rows together (continuous batching): sixteen
   clients cost about what one batch of sixteen prompts costs.
3. **Reports.** After each step the engine thread hands each changed request's *news* (new text,
   new tokens and logprobs, the end) to the event loop of the HTTP side
   (`loop.call_soon_threadsafe`), which streams it out as a server-sent event or keeps it for the
   whole answer.
4. **Bounded.** At most `max_batch_size` requests run and `--max-queue` wait; beyond that a request
   gets 429 with Retry-After. A client that disconnects mid-stream cancels its request: its row is
   free at the next step.
5. **Bad input** gets a 4xx with an OpenAI-style error naming the field (`{"error": {"message",
   "type", "param", "code"}}`); an error inside the engine ends that request only (an error event
   in a stream, a 500 otherwise), never the server, and no traceback goes to the client.

Why Starlette on uvicorn: Starlette is the small ASGI toolkit that FastAPI is built on (routing,
requests, streaming responses), uvicorn the standard ASGI server. FastAPI's pydantic models would
add a dependency and validation errors in FastAPI's own shape; the checks below are explicit, and
each error names its field the way OpenAI's do.
"""

import argparse
import asyncio
import contextlib
import hmac
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from batching import ContinuousBatching, Request
from chat_format import DialogError
from inference import LLaMa
from openai_api import (
    MAX_COMPLETION_LOGPROBS,
    MAX_TOP_LOGPROBS,
    OPENAI_COMPLETION_MAX_TOKENS,
    RETRY_AFTER_SECONDS,
    ApiError,
    News,
    check_stream_options,
    field_of,
    int_in,
    invalid,
    merge,
    refuse_unsupported,
    sampling_from,
    sse,
    usage,
)
from sampling import SamplingParams
from streaming import GenerationRow, TextTracker
from tokenizer import InvalidTextError

DEFAULT_HOST = "127.0.0.1"  # this machine only; --host 0.0.0.0 to serve a network
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_QUEUE = 64  # requests that may wait for a row before new ones get 429
ENGINE_IDLE_POLL_SECONDS = 0.5  # how often an idle engine thread looks whether it should stop
DISCONNECT_POLL_SECONDS = 0.5  # how often a waiting (non-streaming) handler checks its client
WARM_UP_TOKENS = 3  # --compile: decode steps run before serving, so that the step is compiled
MAX_BODY_BYTES = 16 * 2**20  # a request body larger than 16 MiB is refused (413)


# --------------------------------------------------------------------------------------------
# The engine thread
# --------------------------------------------------------------------------------------------


class Engine:
    """The thread that owns the model: takes requests from any thread, steps them in one batch."""

    def __init__(self, llama: LLaMa, max_queue: int = DEFAULT_MAX_QUEUE):
        self.llama = llama
        self.capacity = llama.args.max_batch_size + max_queue  # running + waiting
        self.inbox: queue.Queue = queue.Queue()
        self.in_flight = 0  # submitted and not yet done (guarded by the lock)
        self.lock = threading.Lock()
        self.reporters: dict[Request, Callable[[News], None]] = {}
        self.sent: dict[Request, tuple[int, int]] = {}  # per request: text characters, tokens reported
        self.batcher = ContinuousBatching(llama)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.inbox.put(None)  # wake it up
        self.thread.join()

    def submit(self, request: Request, report: Callable[[News], None]) -> None:
        """Queue `request`; `report` is called (in the engine thread) with its news after each step.
        A full queue is a 429: too many requests are running and waiting already."""
        with self.lock:
            if self.in_flight >= self.capacity:
                raise ApiError(429, f"the server is busy: {self.in_flight} requests are running or waiting "
                                    f"(at most {self.capacity}); retry shortly", code="rate_limit_exceeded",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            self.in_flight += 1
        self.inbox.put((request, report))

    def cancel(self, request: Request) -> None:
        """Free the request's row at the next step (its client went away)."""
        request.cancelled = True
        self.inbox.put(None)  # an idle engine notices at once

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self._take_inbox(block=not self.batcher.busy)
            if self.batcher.busy:
                self._step()

    def _take_inbox(self, block: bool) -> None:
        """Move submitted requests into the scheduler (waiting for one if there is nothing to do)."""
        items = []
        try:
            items.append(self.inbox.get(timeout=ENGINE_IDLE_POLL_SECONDS) if block else self.inbox.get_nowait())
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        for item in items:
            if item is None:  # a wake-up call (a cancel, or stop)
                continue
            request, report = item
            self.reporters[request] = report
            self.sent[request] = (0, 0)
            try:
                self.batcher.submit(request)  # the handler checked it already; this is a second line of defence
            except ValueError as e:
                request.error, request.done = e, True
                self._report(request)

    def _step(self) -> None:
        try:
            changed = self.batcher.step()
        except Exception as e:  # a bug or a device error: fail what is running, keep serving
            traceback.print_exc(file=sys.stderr)
            changed = self.batcher.running + list(self.batcher.waiting)
            for request in changed:
                request.error = RuntimeError(f"internal error: {type(e).__name__}: {e}")
                request.done = True
            self.batcher = ContinuousBatching(self.llama)
        for request in changed:
            self._report(request)

    def _report(self, request: Request) -> None:
        report = self.reporters.get(request)
        if report is None:
            return
        text_sent, tokens_sent = self.sent[request]
        row = request.row
        if row is None:  # refused before it ran
            row = GenerationRow(TextTracker(self.llama.tokenizer, request.sampling.stop))
        news = News(text=row.text.text[text_sent:], tokens=row.tokens[tokens_sent:],
                    logprobs=row.logprobs[tokens_sent:], top=request.top[tokens_sent:len(row.tokens)])
        self.sent[request] = (len(row.text.text), len(row.tokens))
        if request.done:
            news.done = True
            news.finish_reason = row.finish_reason
            news.error = None if request.error is None else str(request.error)
            del self.reporters[request], self.sent[request]
            with self.lock:
                self.in_flight -= 1
        report(news)


# --------------------------------------------------------------------------------------------
# The HTTP side
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One prompt of an HTTP request: its engine request, and the news queue its handler reads."""

    request: Request
    news: asyncio.Queue
    prompt: str = ""  # the prompt's text (completions with echo)


class Server:
    """The OpenAI-compatible routes over one `Engine`."""

    def __init__(self, llama: LLaMa, model_name: str, api_key: Optional[str] = None,
                 max_queue: int = DEFAULT_MAX_QUEUE):
        self.llama = llama
        self.model_name = model_name
        self.api_key = api_key
        self.engine = Engine(llama, max_queue)
        self.created = int(time.time())
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]
        handlers = {ApiError: self._api_error, HTTPException: self._http_error, Exception: self._internal_error}
        self.app = Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan,
                             max_body_size=MAX_BODY_BYTES)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """The engine thread runs while the app is served."""
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    # -- errors ----------------------------------------------------------------------------------

    async def _api_error(self, request: HttpRequest, error: ApiError) -> Response:
        return error.response()

    async def _http_error(self, request: HttpRequest, error: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return ApiError(error.status_code, message.get(error.status_code, str(error.detail))).response()

    async def _internal_error(self, request: HttpRequest, error: Exception) -> Response:
        traceback.print_exception(error, file=sys.stderr)  # for the operator, not the client
        return ApiError(500, f"internal error: {type(error).__name__}").response()

    # -- plain routes ------------------------------------------------------------------------------

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama-from-scratch"}

    async def models(self, request: HttpRequest) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: HttpRequest) -> Response:
        self._authorize(request)
        if request.path_params["model"] != self.model_name:
            raise ApiError(404, f"model {request.path_params['model']!r} does not exist: this server has "
                                f"{self.model_name!r}", param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    # -- what every generation request does first ---------------------------------------------------

    def _authorize(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _body(self, request: HttpRequest) -> dict:
        self._authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        model = field_of(body, "model", (str,), self.model_name, "a string")
        if model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist: this server has {self.model_name!r}",
                           param="model", code="model_not_found")
        refuse_unsupported(body)
        return body

    def _max_tokens(self, body: dict, prompt_len: int, default: Optional[int], param: str) -> int:
        """max_tokens (chat also: max_completion_tokens) within the room the context leaves."""
        room = self.llama.args.max_seq_len - prompt_len
        if room < 1:
            raise invalid(param, f"the prompt is {prompt_len} tokens, and this server's context is "
                                 f"{self.llama.args.max_seq_len} (--max-seq-len): no room to generate",
                          code="context_length_exceeded")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        asked = int_in(body, name, default, 1)
        return room if asked is None else min(asked, room)  # beyond the context: ends with "length"

    def _start(self, prompt_tokens: list[int], max_gen_len: int, sampling: SamplingParams, stop_tokens,
               logprobs: bool, top_logprobs: int) -> Job:
        """Submit one prompt to the engine; its news arrive on the job's queue, in this event loop."""
        loop = asyncio.get_running_loop()
        news: asyncio.Queue = asyncio.Queue()
        generator = self.llama.random_generator(sampling.seed)
        request = Request(prompt_tokens, max_gen_len, sampling, stop_tokens, generator, logprobs=logprobs,
                          top_logprobs=top_logprobs)
        self.engine.submit(request, lambda n: loop.call_soon_threadsafe(news.put_nowait, n))
        return Job(request, news)

    async def _whole(self, jobs: list[Job], http: HttpRequest) -> list[News]:
        """Wait for every job to end; all of each one's news merged. A client that went away
        cancels them (checked every DISCONNECT_POLL_SECONDS)."""
        merged = [News() for _ in jobs]
        try:
            for job, total in zip(jobs, merged):
                while not total.done:
                    try:
                        news = await asyncio.wait_for(job.news.get(), DISCONNECT_POLL_SECONDS)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            raise asyncio.CancelledError
                        continue
                    merge(total, news)
        finally:
            for job in jobs:
                if not job.request.done:
                    self.engine.cancel(job.request)
        for total in merged:
            if total.error is not None:
                raise ApiError(500, total.error, code="generation_failed")
        return merged

    async def _events(self, jobs: list[Job]) -> AsyncIterator[tuple[int, News]]:
        """(job index, news) as they come, from all jobs, until every one has ended. Leaving early
        (the client disconnected: Starlette stops the stream) cancels the jobs still running."""
        pending = {asyncio.ensure_future(job.news.get()): i for i, job in enumerate(jobs)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = pending.pop(task)
                    news = task.result()
                    if not news.done:
                        pending[asyncio.ensure_future(jobs[i].news.get())] = i
                    yield i, news
        finally:
            for task in pending:
                task.cancel()
            for job in jobs:
                if not job.request.done:
                    self.engine.cancel(job.request)

    # -- POST /v1/completions ------------------------------------------------------------------------

    def _prompts(self, body: dict) -> list[list[int]]:
        """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise invalid("prompt", "expected a string, a list of strings, or a list of token ids")
        encoded = []
        for i, one in enumerate(prompt):
            param = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
            if isinstance(one, str):
                try:
                    encoded.append(self.llama.encode_prompt(one, param))
                except InvalidTextError as e:
                    raise invalid(param, str(e)) from None
            elif isinstance(one, list) and one and all(type(t) is int for t in one):
                try:
                    self.llama.check_token_ids(one, param)
                except ValueError as e:
                    raise invalid(param, str(e)) from None
                encoded.append(one)
            else:
                raise invalid(param, "expected a non-empty string or a non-empty list of token ids")
            if not encoded[-1]:
                raise invalid(param, "is empty: give at least one token")
        return encoded

    async def completions(self, http: HttpRequest) -> Response:
        body = await self._body(http)
        prompts = self._prompts(body)
        sampling = sampling_from(body)
        stream = field_of(body, "stream", (bool,), False, "a boolean")
        include_usage = check_stream_options(body, stream)
        echo = field_of(body, "echo", (bool,), False, "a boolean")
        n_logprobs = int_in(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
        if echo and stream:
            raise invalid("echo", "is not supported with stream: true")
        lengths = [self._max_tokens(body, len(p), OPENAI_COMPLETION_MAX_TOKENS, "prompt") for p in prompts]
        jobs = []
        try:
            for p, n in zip(prompts, lengths):
                jobs.append(self._start(p, n, sampling, self.llama.tokenizer.stop_tokens, n_logprobs is not None,
                                        n_logprobs or 0))
        except ApiError:  # the queue filled up part way: none of this request runs
            for job in jobs:
                self.engine.cancel(job.request)
            raise
        for job, prompt in zip(jobs, prompts):
            job.prompt = self.llama.tokenizer.decode(prompt) if echo else ""
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": self.model_name}
        prompt_tokens = sum(len(p) for p in prompts)
        if stream:
            return self._stream(jobs, header, prompt_tokens, include_usage, self._completion_choice_delta)
        answers = await self._whole(jobs, http)
        choices = [{"index": i, "text": job.prompt + a.text, "finish_reason": a.finish_reason,
                    "logprobs": self._completion_logprobs(a, len(job.prompt)) if n_logprobs is not None else None}
                   for i, (job, a) in enumerate(zip(jobs, answers))]
        return JSONResponse({**header, "choices": choices, "usage": usage(prompt_tokens, answers)})

    def _completion_logprobs(self, news: News, start: int = 0) -> dict:
        """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset (characters
        into the choice's text, which begins with `start` characters of echoed prompt)."""
        decode = self.llama.tokenizer.decode
        texts = [decode([t]) for t in news.tokens]
        offsets, at = [], start
        for text in texts:
            offsets.append(at)
            at += len(text)
        top = [{decode([t]): lp for t, lp in alternatives} for alternatives in news.top] if news.top else None
        return {"tokens": texts, "token_logprobs": news.logprobs, "top_logprobs": top, "text_offset": offsets}

    def _completion_choice_delta(self, index: int, news: News, first: bool, shown: int) -> Optional[dict]:
        logprobs = self._completion_logprobs(news, shown) if has_logprobs(news) else None
        if not news.text and not news.done and logprobs is None:
            return None  # e.g. the first bytes of a character: nothing to show yet
        return {"index": index, "text": news.text, "logprobs": logprobs, "finish_reason": news.finish_reason}

    # -- POST /v1/chat/completions -------------------------------------------------------------------

    def _dialog(self, body: dict) -> list[dict]:
        """`messages` as chat_format.py's dialog: roles system (or developer), user, assistant; content a
        string or a list of text parts."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid("messages", "expected a non-empty list of {role, content} objects")
        dialog = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise invalid(f"messages[{i}]", "expected an object with role and content")
            role, content = message.get("role"), message.get("content")
            role = "system" if role == "developer" else role  # OpenAI's newer name for the system prompt
            if role not in ("system", "user", "assistant"):
                raise invalid(f"messages[{i}].role", f"expected system, user or assistant, got {role!r}")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise invalid(f"messages[{i}].content", "only text parts are supported")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise invalid(f"messages[{i}].content", "expected a string or a list of text parts")
            dialog.append({"role": role, "content": content})
        return dialog

    async def chat_completions(self, http: HttpRequest) -> Response:
        body = await self._body(http)
        dialog = self._dialog(body)
        chat_format = self.llama.chat_format
        if chat_format is None:
            raise invalid("messages", "this model's vocabulary has no chat format: use /v1/completions")
        try:
            prompt = chat_format.encode_dialog_prompt(dialog)
        except (DialogError, InvalidTextError) as e:
            raise invalid("messages", str(e)) from None
        sampling = sampling_from(body)
        stream = field_of(body, "stream", (bool,), False, "a boolean")
        include_usage = check_stream_options(body, stream)
        logprobs = field_of(body, "logprobs", (bool,), False, "a boolean")
        top_logprobs = int_in(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top_logprobs and not logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
        max_gen_len = self._max_tokens(body, len(prompt), None, "messages")
        jobs = [self._start(prompt, max_gen_len, sampling, chat_format.stop_tokens, logprobs, top_logprobs)]
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                  "model": self.model_name}
        if stream:
            return self._stream(jobs, {**header, "object": "chat.completion.chunk"}, len(prompt), include_usage,
                                self._chat_choice_delta)
        (answer,) = await self._whole(jobs, http)
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                  "logprobs": {"content": self._chat_logprobs(answer)} if logprobs else None,
                  "finish_reason": answer.finish_reason}
        return JSONResponse({**header, "choices": [choice], "usage": usage(len(prompt), [answer])})

    def _chat_logprobs(self, news: News) -> list[dict]:
        tokenizer = self.llama.tokenizer

        def entry(token: int, logprob: float) -> dict:  # "bytes": exact, even for part of a character
            return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}

        tops = news.top or [[] for _ in news.tokens]
        return [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                for t, lp, top in zip(news.tokens, news.logprobs, tops)]

    def _chat_choice_delta(self, index: int, news: News, first: bool, shown: int) -> Optional[dict]:
        logprobs = {"content": self._chat_logprobs(news)} if has_logprobs(news) else None
        if not news.text and not news.done and not first and logprobs is None:
            return None  # e.g. the first bytes of a character: nothing to show yet
        delta = {"role": "assistant", "content": news.text} if first else ({"content": news.text} if news.text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": news.finish_reason}

    # -- streaming -----------------------------------------------------------------------------------

    def _stream(self, jobs: list[Job], header: dict, prompt_tokens: int, include_usage: bool,
                choice_delta: Callable[[int, News, bool, int], Optional[dict]]) -> StreamingResponse:
        """Server-sent events: one `data: {chunk}` per piece of news, then `data: [DONE]`. A request
        that fails mid-generation ends with an error event (its row is freed by the engine)."""

        async def events() -> AsyncIterator[str]:
            started = [False] * len(jobs)
            made = [0] * len(jobs)
            shown = [0] * len(jobs)  # characters of each choice's text sent so far
            news_stream = self._events(jobs)
            try:
                async for i, news in news_stream:
                    made[i] += len(news.tokens)
                    if news.error is not None:
                        error = {"message": news.error, "type": "server_error", "param": None, "code": "generation_failed"}
                        yield sse({"error": error})
                        continue
                    choice = choice_delta(i, news, not started[i], shown[i])
                    started[i] = True
                    shown[i] += len(news.text)
                    if choice is not None:
                        yield sse({**header, "choices": [choice]})
            finally:  # the client went away (or all ended): nothing of this request keeps running
                await news_stream.aclose()
            if include_usage:
                completion = sum(made)
                yield sse({**header, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                           "completion_tokens": completion, "total_tokens": prompt_tokens + completion}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def warm_up(llama: LLaMa) -> None:
    """Two short requests through the scheduler (`generate` of a list), so that a compiled decode step
    compiles before the first client waits for it."""
    prompt = llama.encode_prompt("Hello", "warm-up prompt")
    llama.generate([prompt, prompt], WARM_UP_TOKENS, SamplingParams(temperature=0))


def has_logprobs(news: News) -> bool:
    """Whether the news carries log-probabilities (asked for, and tokens were made)."""
    return bool(news.logprobs) and news.logprobs[0] is not None


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="An OpenAI-compatible HTTP server (/v1/completions, "
                                                 "/v1/chat/completions, /v1/models, /health).")
    parser.add_argument("--ckpt-dir", type=Path, help="Meta checkpoint dir (default: the demo model)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: the one in --ckpt-dir)")
    parser.add_argument("--model-name", help="the model id clients ask for (default: the checkpoint dir's name)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this "
                                                             "machine only; 0.0.0.0 serves the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help=f"requests decoded together (default {DEFAULT_MAX_BATCH_SIZE})")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"requests that may wait for a row before new ones get 429 (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="context: prompt + answer tokens (default 2048)")
    parser.add_argument("--device", help="cpu, cuda, mps (default: the best there is)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (default: chosen per device: bfloat16 on a CPU)")
    parser.add_argument("--quantize", choices=["int8", "int4", "w8a8"], help="quantize the linear layers on load")
    parser.add_argument("--threads", type=int, help="CPU threads (default: every CPU this process may use, "
                        "no more than its CPU quota's whole CPUs)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (compiled before serving: a minute or two)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0 to 65535, got {args.port}")
    if args.max_queue < 0:
        parser.error(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key is empty")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    import uvicorn  # the ASGI server: only needed to serve

    from checkpoint import CheckpointError
    from cli import demo_checkpoint, how_it_runs

    args = parse_args(argv)
    try:
        ckpt_dir = args.ckpt_dir if args.ckpt_dir is not None else demo_checkpoint(None)
        llama = LLaMa.build(ckpt_dir, tokenizer_path=args.tokenizer, max_seq_len=args.max_seq_len,
                            max_batch_size=args.max_batch_size, device=args.device, dtype=args.dtype,
                            quantize=args.quantize, threads=args.threads, compile=args.compile)
        if args.compile:
            print("compiling the decode step ...", file=sys.stderr)
            warm_up(llama)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = args.model_name or Path(ckpt_dir).name
    print(f"loaded {ckpt_dir} ({how_it_runs(llama)}); serving {name!r} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    server = Server(llama, name, api_key=args.api_key, max_queue=args.max_queue)
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
