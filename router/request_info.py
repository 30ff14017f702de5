"""Parse only what routing needs from an OpenAI request body.

The body is forwarded as the original bytes; this reads it once to learn the
model, whether it streams, max_tokens, a prompt-size estimate and the prompt
text (for prefix hashing). Anything malformed raises GatewayError(400) before
any replica is contacted (docs/reliability.md, M35).
"""

from __future__ import annotations

import json
from typing import Any

from policies import prefix
from router.errors import ErrorKind, GatewayError

MAX_MODEL_CHARS = 256


def _bad(message: str) -> GatewayError:
    return GatewayError(ErrorKind.BAD_FIELD, message)


def parse_body(body: bytes) -> dict[str, Any]:
    if not body:
        raise GatewayError(ErrorKind.BAD_JSON, "request body is empty; expected a JSON object")
    try:
        data = json.loads(body)
    except RecursionError:
        raise GatewayError(ErrorKind.BAD_JSON, "request body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise GatewayError(ErrorKind.BAD_JSON, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise GatewayError(ErrorKind.BAD_JSON, "request body must be a JSON object")
    return data


def _optional_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(f"'{key}' must be a non-negative integer")
    return value


class RequestSummary:
    """The routing-relevant fields of one request."""

    __slots__ = ("max_tokens", "model", "prompt_text", "prompt_tokens", "stream")

    def __init__(
        self, model: str, stream: bool, max_tokens: int | None, prompt_text: str, prompt_tokens: int
    ) -> None:
        self.model = model
        self.stream = stream
        self.max_tokens = max_tokens
        self.prompt_text = prompt_text
        self.prompt_tokens = prompt_tokens


def summarize(endpoint: str, data: dict[str, Any]) -> RequestSummary:
    """``endpoint`` is "chat", "completions" or "embeddings"."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a non-empty string")
    if len(model) > MAX_MODEL_CHARS:
        raise _bad(f"'model' is longer than {MAX_MODEL_CHARS} characters")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean")
    max_tokens = _optional_int(data, "max_tokens")
    if max_tokens is None:
        max_tokens = _optional_int(data, "max_completion_tokens")
    if endpoint == "chat":
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise _bad("'messages' is required and must be an array")
        for message in messages:
            if not isinstance(message, dict):
                raise _bad("each message must be an object")
        text = prefix.chat_prompt_text(messages)
    elif endpoint == "completions":
        prompt = data.get("prompt")
        if not isinstance(prompt, str | list):
            raise _bad("'prompt' is required and must be a string or an array")
        text = prefix.completion_prompt_text(prompt)
    else:
        inp = data.get("input")
        if not isinstance(inp, str | list):
            raise _bad("'input' is required and must be a string or an array")
        text = prefix.completion_prompt_text(inp)
        stream = False
    return RequestSummary(model, stream, max_tokens, text, prefix.estimate_tokens(len(text)))
