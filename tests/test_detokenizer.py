"""Streaming detokenization: multi-byte characters are never split, stop strings never shown."""

from __future__ import annotations

import pytest

from llmc.compiler import tiny
from llmc.runtime.tokenizer import Detokenizer, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer().save_pretrained(directory)
    return Tokenizer(directory, {"eos_token_ids": [2]})


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per byte: the worst case for splitting UTF-8."""
    ids = []
    for ch in text:
        ids.extend(tokenizer.encode(ch, add_special_tokens=False))
    return ids


def test_multibyte_characters_arrive_whole(tokenizer):
    text = "Émile: 東京 🙂 ok"
    ids = [i for ch in text for i in tokenizer._tok.encode(ch).ids]
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(len(tokenizer.encode(ch, add_special_tokens=False)) > 1 for ch in "東🙂")


def test_stop_string_is_not_shown_even_partially(tokenizer):
    ids = tokenizer.encode("Hello world. The end", add_special_tokens=False)
    detok = Detokenizer(tokenizer, stop=["world."])
    shown = ""
    for i in ids:
        shown += detok.push(i)
        assert "wor" not in shown  # held back while it might become the stop string
        if detok.stopped:
            break
    assert detok.stopped and shown + detok.flush() == "Hello "


def test_held_back_text_is_released_when_stop_does_not_complete(tokenizer):
    ids = tokenizer.encode("Hello wonder", add_special_tokens=False)
    detok = Detokenizer(tokenizer, stop=["world"])
    shown = "".join(detok.push(i) for i in ids) + detok.flush()
    assert shown == "Hello wonder" and not detok.stopped


def test_incremental_text_equals_one_decode_and_each_step_decodes_a_short_window(tokenizer):
    """Random ids (special tokens, byte fragments, spaces) give exactly the text one decode of
    all of them gives, and no step decodes more than a few ids: O(new text), not O(everything)."""
    import random

    rng = random.Random(0)
    vocab = tokenizer._tok.get_vocab_size()
    ids = [rng.randrange(vocab) for _ in range(400)]
    widths = []
    decode = tokenizer.decode
    tokenizer.decode = lambda part, **kw: widths.append(len(part)) or decode(part, **kw)
    try:
        detok = Detokenizer(tokenizer)
        text = "".join(detok.push(i) for i in ids) + detok.flush()
    finally:
        del tokenizer.decode  # back to the class's method
    assert text == decode(ids)
    assert max(widths) <= 16 and sum(widths) < 8 * len(ids)
