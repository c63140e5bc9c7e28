"""OpenAI's wire format: the gate that turns a request body into a checked `Request`, the
error shape, and the JSON of answers and stream chunks.

Fields that localmix does not have and that change nothing when left at OpenAI's default
(`user`, `presence_penalty: 0`, `n: 1`, ...) are accepted; those that would ask for something
it cannot do (`n: 2`, `logprobs: true`, a tool message) are a 400 that names the field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import OptionError
from ..events import Summary
from ..sampling import SamplingOptions

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status,
            message,
            kind,
            code,
            param,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(name: str) -> APIError:
    message = (
        f"The model '{name}' does not exist: `localmix list` shows the models, and `demo` "
        "always works"
    )
    return APIError(404, message, code="model_not_found", param="model")


def context_too_long(name: str, tokens: int, context: int, param: str) -> APIError:
    message = (
        f"This model's maximum context length is {context} tokens. However, your prompt "
        f"resulted in {tokens} tokens. Shorten it, or serve {name} with a larger --context."
    )
    return APIError(400, message, code="context_length_exceeded", param=param)


def overloaded(waiting: int) -> APIError:
    message = (
        f"localmix is overloaded: {waiting} requests are already waiting for the model; "
        "try again later"
    )
    return APIError(503, message, kind="server_error", code="overloaded")


def internal_error(message: str) -> APIError:
    return APIError(500, message, kind="server_error", code="internal_error")


class _Body(BaseModel):
    """What both endpoints share: the model, streaming, and the sampling fields (OpenAI's, then
    localmix's extras, as vLLM takes them, in the body)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    return_token_ids: bool = False  # vLLM's extension: each choice carries its token ids


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[_Part] | None = None


class ChatBody(_Body):
    messages: list[_Message]


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None


@dataclass(frozen=True)
class Request:
    """A checked request: what to generate, from which model, with which sampling options."""

    kind: Literal["chat", "completion"]
    model: str | None
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str | list[int] = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    token_ids: bool = False


def chat_request(body: ChatBody) -> Request:
    """The gate of /v1/chat/completions."""
    if not body.messages:
        raise bad_request("messages must hold at least one message", "messages")
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    if messages[-1]["role"] != "user":
        raise bad_request("the last message must be the user's", "messages")
    return Request("chat", body.model or None, messages=messages, **_common(body))


def completion_request(body: CompletionBody) -> Request:
    """The gate of /v1/completions: one prompt, a text or token ids."""
    if body.echo:
        raise bad_request("echo is not supported", "echo")
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    prompt = body.prompt
    text_or_ids: str | list[int]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise bad_request("give one prompt per request", "prompt")
        text_or_ids = str(prompt[0])
    else:
        text_or_ids = prompt  # type: ignore[assignment]  # a text, or token ids (ints)
    if not text_or_ids:
        raise bad_request("the prompt is empty", "prompt")
    return Request("completion", body.model or None, prompt=text_or_ids, **_common(body))


def _message(m: _Message, i: int) -> dict[str, str]:
    role = ROLES.get(m.role)
    if role is None:
        raise bad_request(
            f"messages[{i}]: role '{m.role}' is not supported (use system, user or assistant)",
            f"messages[{i}].role",
        )
    content = m.content or ""
    if isinstance(content, list):
        if any(p.type != "text" for p in content):
            raise bad_request(f"messages[{i}]: only text content is supported", "messages")
        content = "".join(p.text or "" for p in content)
    return {"role": role, "content": content}


def _common(body: _Body) -> dict[str, Any]:
    """Sampling options checked by `SamplingOptions`, the one gate for them."""
    if body.n not in (None, 1):
        raise bad_request("n must be 1: localmix generates one choice per request", "n")
    if body.logprobs:
        raise bad_request("logprobs are not supported", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise bad_request(f"{name} is not supported (use repetition_penalty)", name)
    sampling = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": body.max_completion_tokens
        if body.max_completion_tokens is not None
        else body.max_tokens,
        "stop": body.stop,
        "seed": body.seed,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
    }
    sampling = {k: v for k, v in sampling.items() if v is not None}
    try:
        SamplingOptions().updated(**sampling)
    except OptionError as e:
        raise bad_request(str(e), _named_field(str(e), sampling)) from None
    options = body.stream_options or {}
    return {
        "sampling": sampling,
        "stream": body.stream,
        "include_usage": bool(options.get("include_usage")),
        "token_ids": body.return_token_ids,
    }


def _named_field(message: str, sampling: dict[str, Any]) -> str | None:
    return next((k for k in sampling if message.startswith(k)), None)


# -- answers ---------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(summary: Summary) -> dict[str, int]:
    return {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.generated_tokens,
        "total_tokens": summary.prompt_tokens + summary.generated_tokens,
    }


def extension(summary: Summary) -> dict[str, Any]:
    """localmix's own figures (timings, cache reuse, expert cache), beside OpenAI's fields."""
    return {k: v for k, v in summary.to_dict().items() if k not in ("text", "token_ids")}


def answer(request: Request, rid: str, model: str, summary: Summary) -> dict[str, Any]:
    """The whole answer of a request that does not stream."""
    finish = FINISH_REASONS[summary.stop_reason]
    if request.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": summary.text},
            "logprobs": None,
            "finish_reason": finish,
        }
    else:
        choice = {"index": 0, "text": summary.text, "logprobs": None, "finish_reason": finish}
    if request.token_ids:
        choice["token_ids"] = summary.token_ids
    return {
        "id": rid,
        "object": "chat.completion" if request.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(summary),
        "localmix": extension(summary),
    }


def chunk(
    request: Request,
    rid: str,
    model: str,
    text: str | None,
    *,
    token_ids: list[int] | None = None,
    summary: Summary | None = None,
) -> dict[str, Any]:
    """One streamed chunk: a piece of text (None: the opening chunk of a chat), or the closing
    one with the finish reason and localmix's figures."""
    finish = FINISH_REASONS[summary.stop_reason] if summary is not None else None
    if request.kind == "chat":
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
        choice: dict[str, Any] = {
            "index": 0,
            "delta": {} if summary is not None else delta,
            "logprobs": None,
            "finish_reason": finish,
        }
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if request.token_ids and token_ids is not None:
        choice["token_ids"] = token_ids
    out: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if request.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if summary is not None:
        out["localmix"] = extension(summary)
    return out


def usage_chunk(request: Request, rid: str, model: str, summary: Summary) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage` asks for it: no choices, the usage."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if request.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(summary),
    }
