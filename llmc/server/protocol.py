"""The OpenAI API's request and response shapes for `llmc serve`: each field of a request
checked (type and range) into a `Completion`, errors as OpenAI's error object, and responses and
stream chunks built from the runtime's step events (pure functions; no HTTP here)."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

# The finish reasons of the OpenAI API: an end-of-sequence token and a stop string are both "stop".
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_STOP = 4  # stop strings per request, as the OpenAI API allows


class APIError(Exception):
    """An error answered with OpenAI's error object: {"error": {message, type, param, code}}."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        default = "server_error" if self.status >= 500 else "invalid_request_error"
        kind = self.TYPES.get(self.status, default)
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}


@dataclass
class Completion:
    """One request, checked: a chat (`messages`) or a text completion (`prompt`)."""

    chat: bool
    model: str
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None  # None: what the context leaves
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


# -- field checks: each returns the value to keep, or raises APIError naming the field ----------
def _bad(name: str, what: str) -> APIError:
    return APIError(400, f"'{name}' must be {what}.", param=name)


def _number(low: float, high: float):
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise _bad(name, f"a number from {low} to {high}")
        if not low <= value <= high:
            raise _bad(name, f"from {low} to {high}; got {value}")
        return float(value)

    return check


def _integer(low: int, high: int | None = None):
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, "an integer")
        if value < low or (high is not None and value > high):
            raise _bad(name, f"at least {low}" + (f" and at most {high}" if high else ""))
        return value

    return check


def _boolean(name, value):
    if not isinstance(value, bool):
        raise _bad(name, "true or false")
    return value


def _string(name, value):
    if not isinstance(value, str):
        raise _bad(name, "a string")
    return value


def _only(allowed, what: str):
    """A field llmc accepts only at the value that changes nothing (e.g. n = 1)."""

    def check(name, value):
        if value not in allowed:
            raise APIError(400, f"'{name}' is not supported by llmc serve except as {what}.", name)
        return value

    return check


def _stop(name, value):
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad(name, "a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise _bad(name, f"at most {MAX_STOP} strings")
    return tuple(s for s in stops if s)


def _stream_options(name, value):
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise _bad(name, 'an object like {"include_usage": true}')
    return _boolean(f"{name}.include_usage", value.get("include_usage", False))


def _messages(name, value):
    if not isinstance(value, list) or not value:
        raise _bad(name, "a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _bad(where, f"an object with a 'role' of {', '.join(sorted(ROLES))}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise _bad(f"{where}.content", "a string or a list of text parts")
            content = "".join(_string(f"{where}.content", p.get("text")) for p in content)
        elif content is None and message["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"{where}.content", "a string or a list of text parts")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content})
    return out


def _prompt(name, value):
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str) and value:
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    ):
        return value
    raise _bad(name, "a non-empty string, or a list of token ids (one prompt per request)")


COMMON = {
    "model": _string,
    "max_tokens": _integer(1),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "seed": _integer(-(2**63)),
    "stop": _stop,
    "stream": _boolean,
    "stream_options": _stream_options,
    "n": _only((1,), "n = 1"),
    "presence_penalty": _only((0, 0.0), "0"),
    "frequency_penalty": _only((0, 0.0), "0"),
    "logit_bias": _only(({},), "an empty object"),
    "user": _string,
    # llmc's extensions (as vLLM and llama.cpp's servers name them)
    "top_k": _integer(0),
    "repetition_penalty": _number(0.01, 10),
    "ignore_eos": _boolean,
}
FIELDS = {
    True: {  # chat
        **COMMON,
        "messages": _messages,
        "max_completion_tokens": _integer(1),
        "logprobs": _only((False,), "false"),
        "top_logprobs": _only((0,), "0"),
        "tools": _only(([],), "an empty list"),
        "tool_choice": _only(("none",), '"none"'),
        "parallel_tool_calls": _boolean,
        "response_format": _only(({"type": "text"},), '{"type": "text"}'),
    },
    False: {  # text
        **COMMON,
        "prompt": _prompt,
        "echo": _only((False,), "false"),
        "best_of": _only((1,), "1"),
        "logprobs": _only((0,), "null"),
        "suffix": _only(("",), "null"),
    },
}


def parse(body, chat: bool) -> Completion:
    """A request body (already parsed JSON) -> Completion, or APIError(400) naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object.")
    checks = FIELDS[chat]
    unknown = sorted(set(body) - set(checks))
    if unknown:
        raise APIError(400, f"unrecognized request argument: {unknown[0]}.", param=unknown[0])
    required = "messages" if chat else "prompt"
    for name in ("model", required):
        if body.get(name) is None:
            raise APIError(400, f"'{name}' is required.", param=name)
    values = {k: checks[k](k, v) for k, v in body.items() if v is not None}
    if chat and "max_completion_tokens" in values:
        values["max_tokens"] = values.pop("max_completion_tokens")
    if "stream_options" in values:
        if not values.get("stream"):
            raise APIError(400, "'stream_options' needs 'stream': true.", "stream_options")
        values["include_usage"] = values.pop("stream_options")
    for ignored in ("n", "presence_penalty", "frequency_penalty", "logit_bias", "user", "echo"):
        values.pop(ignored, None)
    for ignored in ("best_of", "logprobs", "suffix", "top_logprobs", "tools", "tool_choice"):
        values.pop(ignored, None)
    values.pop("parallel_tool_calls", None)
    values.pop("response_format", None)
    return Completion(chat=chat, **values)


# -- responses ----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(c: Completion, kind: str, choice: dict) -> dict:
    """What every answer and chunk has around its choice."""
    prefix = "chatcmpl-" if c.chat else "cmpl-"
    return {
        "id": prefix + c.id,
        "object": kind,
        "created": c.created,
        "model": c.model,
        "system_fingerprint": None,
        "choices": [choice],
    }


def response(c: Completion, text: str, finish: str, tokens: tuple[int, int]) -> dict:
    """The whole (non-streamed) answer."""
    if c.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}}
    else:
        choice = {"index": 0, "text": text}
    choice.update(logprobs=None, finish_reason=FINISH[finish])
    kind = "chat.completion" if c.chat else "text_completion"
    return {**_envelope(c, kind, choice), "usage": usage(*tokens)}


def chunk(c: Completion, text: str | None, finish: str | None = None, first: bool = False) -> dict:
    """One streamed chunk: a text delta, or (text None) the finish reason."""
    if c.chat:
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice.update(logprobs=None, finish_reason=FINISH[finish] if finish else None)
    out = _envelope(c, "chat.completion.chunk" if c.chat else "text_completion", choice)
    if c.include_usage:
        out["usage"] = None  # every chunk has the field; the last one (usage_chunk) fills it
    return out


def usage_chunk(c: Completion, tokens: tuple[int, int]) -> dict:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    out = chunk(c, None)
    out["choices"] = []
    out["usage"] = usage(*tokens)
    return out
