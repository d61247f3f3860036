"""OpenAI-compatible request and response shapes (pure: no I/O), plus SpecKV's `speculation` extension."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from speckv.policy import MAX_GAMMA, SERVED_POLICIES
from speckv.records import RequestStats


class APIError(Exception):
    """An error the client caused or should know about, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class SpeculationOptions(BaseModel):
    """SpecKV extension: how to speculate for this request."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal[SERVED_POLICIES] = "adaptive"  # type: ignore[valid-type]  # the registry in speckv.policy
    gamma: int | None = Field(None, ge=1, le=MAX_GAMMA, description="draft length for policy=fixed")

    @model_validator(mode="after")
    def _gamma_only_with_fixed(self) -> "SpeculationOptions":
        if self.policy == "fixed" and self.gamma is None:
            raise ValueError("speculation.policy 'fixed' needs speculation.gamma")
        if self.policy != "fixed" and self.gamma is not None:
            raise ValueError("speculation.gamma is only valid with policy 'fixed'")
        return self

    def policy_spec(self) -> str:
        return f"fixed:{self.gamma}" if self.policy == "fixed" else self.policy


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM extension: the usage so far in every chunk")


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions. Unknown fields are rejected, not ignored.

    OpenAI fields this server does not implement are accepted only at the value that changes nothing, which
    clients and frameworks send explicitly (`frequency_penalty: 0`, `logit_bias: {}`), and refused otherwise: a
    request is answered as asked or not at all."""

    model_config = ConfigDict(extra="forbid")
    # fields OpenAI's API documents as nullable, null meaning the default (clients send `"temperature": null`)
    NULL_MEANS_DEFAULT: ClassVar[tuple[str, ...]] = (
        "temperature", "top_p", "n", "stream", "frequency_penalty", "presence_penalty")
    # OpenAI fields this server does not implement: field -> (the values at which it changes nothing, which are
    # accepted; what any other value asks for, refused by name)
    NO_OP_ONLY: ClassVar[dict[str, tuple[tuple, str]]] = {
        "n": ((1,), "n other than 1 (one choice per request)"),
        "frequency_penalty": ((0,), "frequency_penalty other than 0"),
        "presence_penalty": ((0,), "presence_penalty other than 0"),
        "logit_bias": ((None, {}), "logit_bias"),
    }

    model: str
    max_tokens: int | None = Field(None, description="new tokens at most; default 16 (OpenAI's)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, description="only 1 is supported")
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension (load tools use it): generate max_tokens tokens, "
                             "past end-of-sequence tokens")
    speculation: SpeculationOptions | None = None
    frequency_penalty: float = Field(0.0, description="accepted at 0 only: no penalty is applied")
    presence_penalty: float = Field(0.0, description="accepted at 0 only: no penalty is applied")
    logit_bias: dict[str, float] | None = Field(None, description="accepted empty only")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, body: object) -> object:
        if not isinstance(body, dict):
            return body
        return {k: v for k, v in body.items() if v is not None or k not in cls.NULL_MEANS_DEFAULT}

    @model_validator(mode="after")
    def _stream_options_only_streamed(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only valid with stream: true")
        return self

    @field_validator("*")
    @classmethod
    def _no_op_only(cls, v: object, info: ValidationInfo) -> object:
        """A field of NO_OP_ONLY at any value but those that change nothing: 400, naming the field."""
        rule = cls.NO_OP_ONLY.get(info.field_name)
        if rule is not None and v not in rule[0]:
            raise ValueError(f"{rule[1]} is not supported")
        return v

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)  # the latter: chat's
    @classmethod
    def _positive(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"{info.field_name} must be >= 1")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_SamplingRequest):
    NULL_MEANS_DEFAULT: ClassVar[tuple[str, ...]] = (*_SamplingRequest.NULL_MEANS_DEFAULT, "echo")
    NO_OP_ONLY: ClassVar[dict[str, tuple[tuple, str]]] = {
        **_SamplingRequest.NO_OP_ONLY,
        "echo": ((False,), "echo"),
        "logprobs": ((None,), "logprobs"),
        "best_of": ((None, 1), "best_of other than 1"),
        "suffix": ((None, ""), "suffix (insertion)"),
    }

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="one prompt: text, or token ids (OpenAI's array forms, one element where it is a list of them)")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str] | list[int] | list[list[int]]) -> str | list:
        token_ids = isinstance(prompt, list) and prompt and isinstance(prompt[0], int)
        if isinstance(prompt, list) and not token_ids and len(prompt) != 1:
            raise ValueError("exactly one prompt is supported")
        return prompt

    def prompt_text(self) -> str | None:
        """The prompt as text; None where it was sent as token ids."""
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return prompt if isinstance(prompt, str) else None

    def prompt_token_ids(self) -> list[int] | None:
        """The prompt as token ids where it was sent so; None where it is text."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], str):
            return None
        return self.prompt[0] if isinstance(self.prompt[0], list) else self.prompt


class TextPart(BaseModel):
    """One part of a message's content in OpenAI's array form; text is the only kind a text model reads."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: object) -> object:
        """An image, audio or file part gets one clear error, not pydantic's list of what each union member wanted."""
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise ValueError(f"only text content parts are supported, not {kind!r}")
        return v

    def for_template(self) -> dict:
        """The message as the tokenizer's chat template takes it: content parts joined by newlines (as vLLM joins a
        text-only model's), and `developer`, OpenAI's newer name for the system role, as `system`, the role the
        chat templates know."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        return message if self.name is None else {**message, "name": self.name}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(description="'text' only: no JSON mode or schema is enforced")

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"response_format {v!r} is not supported: answers are plain text")
        return v


class ChatCompletionRequest(_SamplingRequest):
    NO_OP_ONLY: ClassVar[dict[str, tuple[tuple, str]]] = {
        **_SamplingRequest.NO_OP_ONLY,
        "logprobs": ((None, False), "logprobs"),
        "top_logprobs": ((None, 0), "top_logprobs"),
        "tools": ((None, []), "tools (function calling)"),
        "tool_choice": ((None, "none", "auto"), "tool_choice other than 'none' or 'auto'"),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = Field(None, description="meaningless without tools; accepted")

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


SSE_DONE = "data: [DONE]\n\n"


def sse(body: dict) -> str:
    """One server-sent event carrying a JSON body."""
    return f"data: {json.dumps(body)}\n\n"


@dataclass(frozen=True)
class Reply:
    """The shape of one answer (OpenAI's completion or chat completion, whole or streamed): pure functions of
    what the generation produced, so the router only decides when to send what."""

    model: str
    chat: bool
    prompt_tokens: int
    id: str = ""
    created: int = 0

    @classmethod
    def new(cls, model: str, chat: bool, prompt_tokens: int) -> Reply:
        return cls(model, chat, prompt_tokens, new_id("chatcmpl" if chat else "cmpl"), now())

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _envelope(self, obj: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def body(self, text: str, stats: RequestStats) -> dict:
        """The whole answer of a non-streamed request."""
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if self.chat else
                  {"index": 0, "text": text})
        choice.update(finish_reason=stats.finish_reason, logprobs=None)
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice],
                              usage=self.usage(stats.completion_tokens), speculation=stats.speculation())

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False, **extra) -> str:
        """One streamed event: a text delta, the assistant role (chat's first event), or the finish."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return sse(self._envelope(self._chunk_object, [choice], **extra))

    def last_chunk(self, stats: RequestStats) -> str:
        """The finish event, with SpecKV's `speculation` object."""
        return self.chunk(None if self.chat else "", stats.finish_reason, speculation=stats.speculation())

    def usage_chunk(self, stats: RequestStats) -> str:
        """stream_options.include_usage: an event with no choices and the usage."""
        return sse(self._envelope(self._chunk_object, [], usage=self.usage(stats.completion_tokens)))

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"
