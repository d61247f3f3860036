"""The OpenAI request shapes (deployments/protocol.py): what clients send that this server does not implement is
accepted where it changes nothing and refused, naming the field, where it would."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.protocol import ChatCompletionRequest, CompletionRequest

USER = [{"role": "user", "content": "hi"}]


def _refused(cls, field: str, **body) -> str:
    with pytest.raises(ValidationError) as e:
        cls(model="m", **body)
    errors = e.value.errors()
    assert errors[0]["loc"][0] == field, errors
    return errors[0]["msg"]


def test_content_parts_are_read_as_the_text_they_join():
    parts = ChatCompletionRequest(model="m", messages=[
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}])
    plain = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "first\nsecond"}])
    assert parts.messages[0].for_template() == plain.messages[0].for_template() == {
        "role": "user", "content": "first\nsecond"}


def test_the_developer_role_is_the_system_role():
    developer = ChatCompletionRequest(model="m", messages=[{"role": "developer", "content": "be brief"}, *USER])
    assert developer.messages[0].for_template() == {"role": "system", "content": "be brief"}


def test_a_part_that_is_not_text_is_refused_by_its_kind():
    image = {"type": "image_url", "image_url": {"url": "x"}}
    msg = _refused(ChatCompletionRequest, "messages",
                   messages=[{"role": "user", "content": [{"type": "text", "text": "see"}, image]}])
    assert "only text content parts" in msg and "image_url" in msg


def test_fields_at_the_value_that_changes_nothing_are_accepted():
    ChatCompletionRequest(model="m", messages=USER, frequency_penalty=0, presence_penalty=0.0, logit_bias={},
                          logprobs=False, top_logprobs=0, response_format={"type": "text"}, tools=[],
                          tool_choice="none", parallel_tool_calls=False)
    CompletionRequest(model="m", prompt="a", frequency_penalty=0.0, presence_penalty=0, logit_bias=None, best_of=1,
                      suffix="")


@pytest.mark.parametrize("cls, field, value", [
    (ChatCompletionRequest, "frequency_penalty", 0.5),
    (ChatCompletionRequest, "presence_penalty", -1.0),
    (ChatCompletionRequest, "logit_bias", {"42": 100}),
    (ChatCompletionRequest, "logprobs", True),
    (ChatCompletionRequest, "top_logprobs", 3),
    (ChatCompletionRequest, "response_format", {"type": "json_object"}),
    (ChatCompletionRequest, "tools", [{"type": "function", "function": {"name": "f"}}]),
    (ChatCompletionRequest, "tool_choice", "required"),
    (ChatCompletionRequest, "max_completion_tokens", 0),
    (CompletionRequest, "best_of", 3),
    (CompletionRequest, "suffix", "}"),
    (CompletionRequest, "frequency_penalty", 2.0),
])
def test_fields_that_would_change_the_answer_are_refused(cls, field, value):
    body = {"messages": USER} if cls is ChatCompletionRequest else {"prompt": "a"}
    msg = _refused(cls, field, **body, **{field: value})  # the error names the field (its `loc`)
    assert "not supported" in msg or "must be >= 1" in msg, msg


def test_null_is_the_default_where_openai_documents_the_field_nullable():
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "frequency_penalty", "presence_penalty"))
    chat = ChatCompletionRequest(model="m", messages=USER, **nulls)
    completion = CompletionRequest(model="m", prompt="a", echo=None, **nulls)
    defaults = ChatCompletionRequest(model="m", messages=USER)
    for request in (chat, completion):
        assert (request.temperature, request.top_p, request.n, request.stream) == (
            defaults.temperature, defaults.top_p, defaults.n, defaults.stream) == (1.0, 1.0, 1, False)
    with pytest.raises(ValidationError):  # not every field: `model` is required
        ChatCompletionRequest(model=None, messages=USER)
    _refused(ChatCompletionRequest, "echo", messages=USER, echo=None)  # nor a field of the other endpoint


@pytest.mark.parametrize("prompt, text, ids", [
    ("def f():", "def f():", None), (["def f():"], "def f():", None),
    ([1, 2, 3], None, [1, 2, 3]), ([[4, 5]], None, [4, 5]),
])
def test_a_prompt_is_text_or_token_ids_in_openais_forms(prompt, text, ids):
    request = CompletionRequest(model="m", prompt=prompt)
    assert (request.prompt_text(), request.prompt_token_ids()) == (text, ids)


@pytest.mark.parametrize("prompt", [[], ["a", "b"], [[1], [2]], [1, "a"]])
def test_more_than_one_prompt_or_a_mixed_one_is_refused(prompt):
    _refused(CompletionRequest, "prompt", prompt=prompt)


def test_stream_options_without_streaming_are_refused_not_ignored():
    with pytest.raises(ValidationError, match="only valid with stream: true"):
        CompletionRequest(model="m", prompt="a", stream_options={"include_usage": True})
    assert CompletionRequest(model="m", prompt="a", stream=True, stream_options={"include_usage": True}).stream_options
