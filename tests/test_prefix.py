"""Prompt text and chained prefix-block hashes (policies/prefix.py)."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from policies.prefix import (
    BLOCK_CHARS,
    MAX_BLOCKS,
    block_hashes,
    chat_prompt_text,
    completion_prompt_text,
    estimate_tokens,
)


def blocks(*fills: str) -> str:
    """One full block per fill character."""
    return "".join(f * BLOCK_CHARS for f in fills)


# -- block hashes ------------------------------------------------------------------


def test_one_hash_per_full_block_and_the_partial_tail_is_not_hashed() -> None:
    assert block_hashes("") == ()
    assert block_hashes("a" * (BLOCK_CHARS - 1)) == ()
    assert len(block_hashes(blocks("a"))) == 1
    assert len(block_hashes(blocks("a", "b") + "c" * (BLOCK_CHARS - 1))) == 2
    # The tail does not change the hashes of the full blocks before it.
    assert block_hashes(blocks("a", "b") + "tail") == block_hashes(blocks("a", "b"))


def test_equal_prefixes_give_equal_hashes_up_to_the_first_difference() -> None:
    x = block_hashes(blocks("s", "s", "u", "v"))
    y = block_hashes(blocks("s", "s", "w", "v"))
    assert x[:2] == y[:2]
    assert x[2] != y[2]


def test_hashes_are_chained_through_every_earlier_block() -> None:
    """Block i's hash covers blocks 0..i: the same block after a different
    prefix hashes differently (as vLLM's prefix-cache keys do)."""
    x = block_hashes(blocks("a", "z", "z"))
    y = block_hashes(blocks("b", "z", "z"))
    assert all(hx != hy for hx, hy in zip(x, y, strict=True))
    # And a block's hash is not just its own content's.
    assert block_hashes(blocks("z"))[0] not in x[1:]


def test_hashes_are_crc32_and_adler32_chained_side_by_side() -> None:
    """The format is fixed and process-independent (no ``hash()``), so
    gateways, replicas and simulator runs agree."""
    text = blocks("p", "q")
    b0, b1 = text[:BLOCK_CHARS].encode(), text[BLOCK_CHARS:].encode()
    crc0, adler0 = zlib.crc32(b0), zlib.adler32(b0)
    crc1, adler1 = zlib.crc32(b1, crc0), zlib.adler32(b1, adler0)
    assert block_hashes(text) == ((crc0 << 32) | adler0, (crc1 << 32) | adler1)


def test_at_most_max_blocks_are_hashed() -> None:
    text = blocks("m") * (MAX_BLOCKS + 5)
    hashes = block_hashes(text)
    assert len(hashes) == MAX_BLOCKS
    assert hashes == block_hashes(text[: MAX_BLOCKS * BLOCK_CHARS])


def test_blocks_are_counted_in_characters_not_bytes() -> None:
    """Multi-byte characters do not shift block boundaries: a non-ASCII
    character in block 2 leaves blocks 0 and 1 hashed as in pure ASCII."""
    ascii_text = blocks("a", "b", "c")
    accented = ascii_text[: 2 * BLOCK_CHARS] + "é" * BLOCK_CHARS
    assert len(block_hashes(accented)) == 3
    assert block_hashes(accented)[:2] == block_hashes(ascii_text)[:2]
    assert block_hashes(accented)[2] != block_hashes(ascii_text)[2]


def test_lone_surrogates_are_hashed_not_raised() -> None:
    text = "\ud800" * BLOCK_CHARS  # not encodable as strict UTF-8
    assert len(block_hashes(text)) == 1


def test_block_size_is_a_parameter() -> None:
    assert len(block_hashes("x" * 100, block_chars=10)) == 10


# -- prompt text -----------------------------------------------------------------------


def test_chat_prompt_text_keeps_roles_order_and_boundaries() -> None:
    one = chat_prompt_text([{"role": "user", "content": "ab"}])
    two = chat_prompt_text([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    swapped = chat_prompt_text(
        [{"role": "assistant", "content": "ab"}],
    )
    assert len({one, two, swapped}) == 3
    assert "ab" in one and one.startswith("user")


def test_chat_prompt_text_reads_text_parts_only() -> None:
    parts = [
        {"type": "text", "text": "hello "},
        {"type": "image_url", "image_url": {"url": "data:..."}},
        {"type": "text", "text": "world"},
    ]
    assert chat_prompt_text([{"role": "user", "content": parts}]) == chat_prompt_text(
        [{"role": "user", "content": "hello world"}]
    )


@pytest.mark.parametrize(
    "messages",
    [
        ["not a message", 3, None, ["list"]],
        [{"role": 5, "content": None}],
        [{"content": 42}],
        [{"role": "user", "content": [None, "bare string", {"text": 7}, {"no": "text"}]}],
        [{"role": "user", "content": {"text": "a dict, not a list"}}],
    ],
)
def test_chat_prompt_text_tolerates_malformed_messages(messages: list[Any]) -> None:
    text = chat_prompt_text(messages)
    assert isinstance(text, str)
    assert block_hashes(text) == ()  # nothing malformed contributes content


def test_chat_prompt_text_skips_only_the_malformed_parts() -> None:
    good = {"role": "user", "content": "kept"}
    assert chat_prompt_text(["junk", good, {"role": None}]).count("kept") == 1
    assert chat_prompt_text(["junk", good]) == chat_prompt_text([good])


def test_completion_prompt_text() -> None:
    assert completion_prompt_text("plain") == "plain"
    joined = completion_prompt_text(["a", 3, "b"])
    assert joined.startswith("a") and joined.endswith("b") and joined != "ab"
    assert completion_prompt_text([1, 2]) == ""
    assert completion_prompt_text(None) == ""
    assert completion_prompt_text({"prompt": "x"}) == ""


@pytest.mark.parametrize(("chars", "tokens"), [(0, 0), (1, 1), (4, 1), (5, 2), (400, 100)])
def test_estimate_tokens_rounds_up(chars: int, tokens: int) -> None:
    assert estimate_tokens(chars) == tokens
