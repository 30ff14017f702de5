"""The OpenAI-compatible bodies the simulated replica reads and writes, as vLLM does.

Requests: a chat or completion body parsed into a :class:`Generation` (model,
stream, max_tokens, the prompt text and its size and prefix blocks), with
vLLM's refusals (400 for a bad field, 404 for an unknown model, the
context-length 400). Responses: OpenAI-shaped errors, SSE chunks,
non-streaming bodies, usage, embeddings.

Output is deterministic: token ``i`` of every response is the text
``"t{i} "``, so a test can byte-compare what a client received with what the
replica produced.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from loadtest.replica.config import SimReplicaConfig
from policies.prefix import block_hashes, chat_prompt_text, completion_prompt_text, estimate_tokens

Kind = Literal["chat", "completion"]

DRAIN_HEADER = "x-dp-draining"
# vLLM's OpenAI server reports this in /v1/models; some clients check it.
OWNED_BY = "vllm"
# Embedding vectors are tiny: their content is irrelevant to routing tests.
EMBEDDING_DIM = 8

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class BadRequest(Exception):
    """A request the replica refuses before generating (400, or 404 for a model)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------
# errors


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "ServerError" if status >= 500 else "BadRequestError")


def error_response(
    status: int,
    message: str,
    code: str | int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI-shaped error, as vLLM sends it (``code`` defaults to the status)."""
    body = {"error": {"message": message, "type": error_type(status), "code": code or status}}
    return web.json_response(body, status=status, headers=headers)


def draining_response() -> web.Response:
    """503 with the drain marker a gateway recognises (``x-dp-draining: 1``)."""
    return error_response(503, "replica is draining", code="draining", headers={DRAIN_HEADER: "1"})


def in_band_error(status: int, message: str) -> bytes:
    """The SSE event vLLM sends when a stream fails after its headers."""
    err = {"error": {"message": message, "type": error_type(status), "code": status}}
    return b"data: " + json.dumps(err).encode() + b"\n\n"


# ---------------------------------------------------------------------------
# requests


@dataclass(slots=True)
class Generation:
    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int
    prompt_text: str
    prompt_tokens: int
    block_hashes: tuple[int, ...] = field(default_factory=tuple)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise BadRequest(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "request body must be a JSON object")
    return body


def resolve_model(cfg: SimReplicaConfig, body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        return cfg.models[0]
    if not isinstance(model, str):
        raise BadRequest(400, "model must be a string")
    if model not in cfg.models:
        raise BadRequest(404, f"The model `{model}` does not exist.")
    return model


def parse_generation(cfg: SimReplicaConfig, body: dict[str, Any], kind: Kind) -> Generation:
    model = resolve_model(cfg, body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(400, "stream must be a boolean")
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = cfg.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(400, "max_tokens must be an integer >= 1")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise BadRequest(400, "messages must be a list")
        text = chat_prompt_text(messages)
    else:
        if "prompt" not in body:
            raise BadRequest(400, "prompt is required")
        text = completion_prompt_text(body["prompt"])
    prompt_tokens = estimate_tokens(len(text))
    if prompt_tokens + max_tokens > cfg.max_model_len:
        # vLLM's context-length refusal: the classic client error.
        raise BadRequest(
            400,
            f"This model's maximum context length is {cfg.max_model_len} tokens. However, "
            f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
            f"messages, {max_tokens} in the completion). Please reduce the length of the "
            "messages or completion.",
        )
    return Generation(
        kind=kind,
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        prompt_text=text,
        prompt_tokens=prompt_tokens,
        block_hashes=block_hashes(text),
    )


# ---------------------------------------------------------------------------
# responses


def token_text(i: int) -> str:
    return f"t{i} "


def _object(kind: Kind, stream: bool) -> str:
    if kind == "completion":
        return "text_completion"
    return "chat.completion.chunk" if stream else "chat.completion"


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def chunk(gen: Generation, rid: str, created: int, i: int | None, finish: str | None) -> bytes:
    """One SSE event: token ``i`` (None: no text, e.g. the closing finish_reason)."""
    choice: dict[str, Any]
    text = "" if i is None else token_text(i)
    if gen.kind == "chat":
        delta: dict[str, Any] = {}
        if i == 0:
            delta["role"] = "assistant"
        delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return _sse(
        {
            "id": rid,
            "object": _object(gen.kind, True),
            "created": created,
            "model": gen.model,
            "choices": [choice],
        }
    )


class Chunks:
    """SSE token events for one response, built from a per-request template.

    Serializing a whole chunk per token cost more than everything else the
    replica does per token; a middle token's event differs only in its text,
    so it is the template's head + text + tail. :func:`chunk` remains the one
    definition: the template is cut from its output, and the tests check the
    two agree byte for byte.
    """

    def __init__(self, gen: Generation, rid: str, created: int) -> None:
        self.gen, self.rid, self.created = gen, rid, created
        probe = chunk(gen, rid, created, None, None).decode()
        # The text is the last string in the chunk (only null fields follow),
        # so the last '""' is it whatever an escaped request id contains.
        head, _, tail = probe.rpartition('""')
        self._head, self._tail = head.encode(), tail.encode()

    def event(self, i: int, finish: str | None) -> bytes:
        if i == 0 or finish is not None:
            return chunk(self.gen, self.rid, self.created, i, finish)
        return self._head + f'"{token_text(i)}"'.encode() + self._tail


def usage(gen: Generation, n: int) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": gen.prompt_tokens + n,
    }


def usage_chunk(gen: Generation, rid: str, created: int, n: int) -> bytes:
    """The stream's usage event (``stream_options.include_usage``): no choices."""
    return _sse(
        {
            "id": rid,
            "object": _object(gen.kind, True),
            "created": created,
            "model": gen.model,
            "choices": [],
            "usage": usage(gen, n),
        }
    )


def completion_body(gen: Generation, rid: str, created: int, n: int) -> bytes:
    """A non-streaming answer of ``n`` tokens."""
    finish_reason = "length" if n >= gen.max_tokens else "stop"
    text = "".join(token_text(i) for i in range(n))
    choice: dict[str, Any]
    if gen.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    payload = {
        "id": rid,
        "object": _object(gen.kind, False),
        "created": created,
        "model": gen.model,
        "choices": [choice],
        "usage": usage(gen, n),
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def embedding(text: str) -> list[float]:
    """A small deterministic unit-ish vector derived from the text."""
    seed = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    raw = struct.unpack(f"<{EMBEDDING_DIM}h", seed[: 2 * EMBEDDING_DIM])
    return [round(v / 32768.0, 6) for v in raw]


def embeddings_body(cfg: SimReplicaConfig, body: dict[str, Any]) -> dict[str, Any]:
    """The answer to an embeddings request (raises BadRequest)."""
    model = resolve_model(cfg, body)
    inp = body.get("input")
    items = [inp] if isinstance(inp, str) else inp
    if not isinstance(items, list) or not items:
        raise BadRequest(400, "input must be a string or a non-empty list")
    texts = [x if isinstance(x, str) else json.dumps(x) for x in items]
    tokens = sum(estimate_tokens(len(t)) for t in texts)
    return {
        "object": "list",
        "model": model,
        "data": [
            {"object": "embedding", "index": i, "embedding": embedding(t)}
            for i, t in enumerate(texts)
        ],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def models_body(cfg: SimReplicaConfig, created: int) -> dict[str, Any]:
    """``GET /v1/models``, with vLLM's extra fields."""
    data = [
        {
            "id": m,
            "object": "model",
            "created": created,
            "owned_by": OWNED_BY,
            "root": cfg.models[0],
            "parent": None,
            "max_model_len": cfg.max_model_len,
        }
        for m in cfg.models
    ]
    return {"object": "list", "data": data}
