"""What the Generator's callers pass, checked at the API boundary: every wrong prompt, message
or option is one LlmcError with a sentence that says what is expected, before any work."""

from __future__ import annotations

import numbers

import numpy as np

from llmc.errors import LlmcError, SessionError

PROMPT_KINDS = "a string, a list of token ids or a list of chat messages"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _name(value) -> str:
    return type(value).__name__


def prompt_kind(prompt) -> str:
    """ "text", "ids" or "messages"; LlmcError for anything else."""
    if isinstance(prompt, str):
        return "text"
    if isinstance(prompt, np.ndarray) and prompt.ndim == 1:
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)):
        if all(_is_int(t) for t in prompt):
            return "ids"
        if all(isinstance(m, dict) for m in prompt):
            return "messages"
        odd = next(x for x in prompt if not _is_int(x) and not isinstance(x, dict))
        raise LlmcError(f"a prompt must be {PROMPT_KINDS} (got a list holding {_name(odd)}).")
    raise LlmcError(f"a prompt must be {PROMPT_KINDS} (got {_name(prompt)}).")


def token_ids(prompt, vocab_size: int) -> list[int]:
    """A prompt of token ids as ints, each checked against the vocabulary."""
    ids = [int(t) for t in prompt]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise SessionError(f"token id {bad[0]} is outside the vocabulary (0 to {vocab_size - 1}).")
    return ids


def messages(prompt) -> list[dict]:
    """Chat messages: dicts with a string role and a string content (None only for an
    assistant's tool calls)."""
    for i, m in enumerate(prompt):
        role, content = m.get("role"), m.get("content")
        tool_call = role == "assistant" and content is None and "tool_calls" in m
        if not isinstance(role, str) or not role or not (isinstance(content, str) or tool_call):
            raise LlmcError(
                f"messages[{i}] must be a dict with a string 'role' and a string 'content', "
                f'e.g. {{"role": "user", "content": "Hi"}}.'
            )
    return list(prompt)


def prompt_list(prompts) -> list:
    """The prompts of a batch: a non-empty list (a string is one prompt, not a batch)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)) or not prompts:
        got = "an empty list" if isinstance(prompts, (list, tuple)) else _name(prompts)
        raise LlmcError(f"a batch must be a non-empty list of prompts (got {got}).")
    return list(prompts)


def max_new_tokens(value) -> int:
    if not _is_int(value) or value < 1:
        raise LlmcError(f"max_new_tokens must be an integer of at least 1, not {value!r:.40}.")
    return int(value)


def stop_strings(stop) -> tuple[str, ...]:
    """A stop string or a list of them (None: none)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise LlmcError("stop must be a string or a list of strings.")


def num_draft(value) -> int | None:
    if value is not None and not _is_int(value):
        raise LlmcError(f"num_draft must be an integer, not {value!r:.40}.")
    return value
