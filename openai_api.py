"""The OpenAI API's wire format, as server.py speaks it: request fields checked one by one, errors
in OpenAI's shape, and the pieces of a response.

Every check names the field it is about, so that a client gets
`{"error": {"message": "top_p: must be in (0.0, 1.0], got 1.5", "type": "invalid_request_error",
"param": "top_p", "code": null}}` with a 400, as OpenAI's own API answers, and never a traceback.
Defaults are OpenAI's (temperature 1, top_p 1), not Meta's (0.6, 0.9): clients written for that
API expect them. Extensions that llama.cpp and vLLM also accept: top_k, repetition_penalty.
"""

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from starlette.responses import JSONResponse

from sampling import SamplingParams

RETRY_AFTER_SECONDS = 1
# OpenAI's defaults: sampling at temperature 1 with no nucleus cut; a completion of 16 tokens.
OPENAI_TEMPERATURE = 1.0
OPENAI_TOP_P = 1.0
OPENAI_COMPLETION_MAX_TOKENS = 16
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' "logprobs": how many alternatives per token, 0 to 5
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions' "top_logprobs": 0 to 20


# --------------------------------------------------------------------------------------------
# Errors in OpenAI's shape
# --------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error answered as OpenAI answers it: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def invalid(param: str, message: str, code: Optional[str] = None) -> ApiError:
    """A 400 naming the request field `param`."""
    return ApiError(400, f"{param}: {message}", param=param, code=code)


# --------------------------------------------------------------------------------------------
# Reading a request's fields: each check names its field
# --------------------------------------------------------------------------------------------


def field_of(body: dict, name: str, kinds: tuple, default: Any = None, what: str = "") -> Any:
    """body[name] if it is one of `kinds` (None counts as absent), else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:  # JSON true is not a number here
        raise invalid(name, f"expected {what or kinds[0].__name__}, got a boolean")
    if not isinstance(value, kinds):
        raise invalid(name, f"expected {what or kinds[0].__name__}, got {type(value).__name__}")
    return value


def number_in(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = float(field_of(body, name, (int, float), default, "a number"))
    if not (low < value if low_open else low <= value) or not value <= high:
        bracket = "(" if low_open else "["
        raise invalid(name, f"must be in {bracket}{low}, {high}], got {value}")
    return value


def int_in(body: dict, name: str, default: Optional[int], low: int, high: Optional[int] = None) -> Optional[int]:
    value = field_of(body, name, (int,), default, "an integer")
    if value is not None and (value < low or (high is not None and value > high)):
        raise invalid(name, f"must be an integer from {low}" + (f" to {high}" if high is not None else " up")
                      + f", got {value}")
    return value


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise invalid("stop", "expected a non-empty string or a list of them")
    return stop


def refuse_unsupported(body: dict) -> None:
    """Fields of OpenAI's API this server does not implement: an error rather than a silent default."""
    if field_of(body, "n", (int,), 1, "an integer") != 1:
        raise invalid("n", "only n=1 is supported (send the request again for another sample)")
    for name in ("presence_penalty", "frequency_penalty"):
        if field_of(body, name, (int, float), 0, "a number") != 0:
            raise invalid(name, "is not supported (repetition_penalty is, as an extension)")
    if field_of(body, "logit_bias", (dict,), {}, "an object"):
        raise invalid("logit_bias", "is not supported")
    for name in ("tools", "functions", "response_format"):
        if body.get(name):
            raise invalid(name, "is not supported by this server")


def sampling_from(body: dict) -> SamplingParams:
    """The request's sampling settings (OpenAI's defaults: temperature 1, top_p 1)."""
    temperature = number_in(body, "temperature", OPENAI_TEMPERATURE, 0.0, MAX_TEMPERATURE)
    top_p = number_in(body, "top_p", OPENAI_TOP_P, 0.0, 1.0, low_open=True)
    top_k = int_in(body, "top_k", None, 0)  # an extension (llama.cpp, vLLM); 0 = no cut
    repetition_penalty = number_in(body, "repetition_penalty", 1.0, 1e-2, 1e2)
    seed = field_of(body, "seed", (int,), None, "an integer")
    try:
        return SamplingParams(temperature, top_p, top_k or None, repetition_penalty, seed, stop_strings(body))
    except ValueError as e:  # e.g. a seed out of 64-bit range
        raise invalid("seed" if "seed" in str(e) else "stop", str(e)) from None


def check_stream_options(body: dict, stream: bool) -> bool:
    """Whether the stream ends with a usage chunk (stream_options.include_usage)."""
    options = field_of(body, "stream_options", (dict,), {}, "an object")
    if options and not stream:
        raise invalid("stream_options", "is only allowed with stream: true")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid("stream_options.include_usage", "expected a boolean")
    return include


@dataclass
class News:
    """What one request made since its last report, handed from the engine thread to its handler."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Optional[float]] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None  # the request failed: why, in one line
    done: bool = False


def merge(total: News, news: News) -> None:
    """Add one report to what a request made before."""
    total.text += news.text
    total.tokens += news.tokens
    total.logprobs += news.logprobs
    total.top += news.top
    total.finish_reason, total.error, total.done = news.finish_reason, news.error, news.done


def usage(prompt_tokens: int, answers: list[News]) -> dict:
    completion = sum(len(a.tokens) for a in answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"
