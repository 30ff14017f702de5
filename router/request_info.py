"""Parse only what routing needs from an OpenAI request body.

The body is forwarded as the original bytes; this reads it once to learn the
model, whether it streams, max_tokens, a prompt-size estimate and the prompt
text (for prefix hashing). Anything malformed raises GatewayError(400) before
any replica is contacted (docs/reliability.md, M35).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from policies import prefix
from router.errors import ErrorKind, GatewayError

MAX_MODEL_CHARS = 256


def _bad(message: str) -> GatewayError:
    return GatewayError(ErrorKind.BAD_FIELD, message)


def parse_body(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or GatewayError(400).

    orjson first: twice as fast as the json module on a long prompt (the
    gateway's per-byte cost) and three times on a small one. What it
    refuses goes to the json module, so the gateway accepts exactly what it
    always did (``NaN``, a UTF-8 BOM, UTF-16, lone surrogate escapes, all of
    which orjson refuses as RFC 8259 says); only such bodies, and malformed
    ones, are parsed twice. (orjson reads integers beyond 64 bits as floats:
    as ``max_tokens`` that is now a 400 instead of a forwarded number.)
    """
    if not body:
        raise GatewayError(ErrorKind.BAD_JSON, "request body is empty; expected a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:  # a ValueError
        data = _json_module(body)
    if not isinstance(data, dict):
        raise GatewayError(ErrorKind.BAD_JSON, "request body must be a JSON object")
    return data


def _json_module(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise GatewayError(ErrorKind.BAD_JSON, "request body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise GatewayError(ErrorKind.BAD_JSON, f"request body is not valid JSON: {exc}") from None


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


# The OpenAI-compatible routes the data listener forwards, by path, and the
# kind of body each carries. vLLM serves all of them; SGLang most. A path
# not here is a 404 at the gateway (the upstream path never comes from a
# request's body or headers).
ENDPOINTS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/rerank": "rerank",
    "/v1/score": "score",
    "/score": "score",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
    "/v1/audio/transcriptions": "audio",
    "/v1/audio/translations": "audio",
}


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a non-empty string")
    if len(model) > MAX_MODEL_CHARS:
        raise _bad(f"'model' is longer than {MAX_MODEL_CHARS} characters")
    return model


def _stream(data: dict[str, Any]) -> bool:
    stream = data.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean")
    return stream


def _texts(value: Any, field: str) -> str:
    """A string or a list of strings (the score and rerank fields)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return prefix.completion_prompt_text(value)
    raise _bad(f"'{field}' is required and must be a string or an array")


def summarize(endpoint: str, data: dict[str, Any]) -> RequestSummary:
    """The routing fields of a JSON body; ``endpoint`` is a kind from ENDPOINTS.

    The common, valid fields are checked in line; anything else goes through
    the helpers, which raise the precise 400 (one Python call per field cost
    more than the checks)."""
    get = data.get
    model = get("model")
    if model.__class__ is not str or not model or len(model) > MAX_MODEL_CHARS:
        model = _model(data)
    stream = get("stream", False)
    if stream is not False and stream is not True:
        stream = _stream(data)
    max_tokens = get("max_tokens")
    if max_tokens is not None and (max_tokens.__class__ is not int or max_tokens < 0):
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
    elif endpoint == "embeddings":
        inp = data.get("input")
        if not isinstance(inp, str | list):
            raise _bad("'input' is required and must be a string or an array")
        text = prefix.completion_prompt_text(inp)
        stream = False
    elif endpoint == "responses":
        inp = data.get("input")
        if not isinstance(inp, str | list):
            raise _bad("'input' is required and must be a string or an array")
        instructions = data.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise _bad("'instructions' must be a string")
        if max_tokens is None:
            max_tokens = _optional_int(data, "max_output_tokens")
        body = inp if isinstance(inp, str) else prefix.chat_prompt_text(inp)
        text = (instructions or "") + body
    elif endpoint == "rerank":
        query = data.get("query")
        if not isinstance(query, str):
            raise _bad("'query' is required and must be a string")
        documents = data.get("documents")
        if not isinstance(documents, list):
            raise _bad("'documents' is required and must be an array")
        text = query + prefix.completion_prompt_text(documents)
        stream = False
    elif endpoint == "score":
        text = _texts(data.get("text_1"), "text_1") + _texts(data.get("text_2"), "text_2")
        stream = False
    elif endpoint == "tokenize":
        if isinstance(data.get("messages"), list):
            text = prefix.chat_prompt_text(data["messages"])
        else:
            text = _texts(data.get("prompt"), "prompt")
        stream = False
    elif endpoint == "detokenize":
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise _bad("'tokens' is required and must be an array")
        text = ""
        stream = False
    else:
        raise ValueError(f"not a JSON endpoint: {endpoint!r}")
    return RequestSummary(model, stream, max_tokens, text, prefix.estimate_tokens(len(text)))


# Form fields routing reads from a multipart body; everything else (the
# audio file) is forwarded untouched and never parsed.
_FORM_FIELDS = (b"model", b"stream")
_MAX_FIELD_BYTES = 1024


def summarize_form(body: bytes, content_type: str) -> RequestSummary:
    """The routing fields of a multipart/form-data body (audio transcription).

    Reads only the small ``model`` and ``stream`` fields, by scanning part
    headers; the file part is skipped, whatever its size.
    """
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise _bad("expected a multipart/form-data body")
    boundary = ""
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary or len(boundary) > 200:
        raise _bad("multipart body without a valid boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    fields: dict[bytes, bytes] = {}
    for part in (b"\r\n" + body).split(delimiter)[1:]:
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        for name in _FORM_FIELDS:
            if b'name="' + name + b'"' in head and len(content) <= _MAX_FIELD_BYTES + 2:
                fields[name] = content.removesuffix(b"\r\n")
    try:
        model = fields[b"model"].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError):
        raise _bad("'model' is required as a form field") from None
    stream = fields.get(b"stream", b"false").strip().lower() == b"true"
    return RequestSummary(_model({"model": model}), stream, None, "", 0)
