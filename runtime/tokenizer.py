"""Tokenizer, chat template and UTF-8-safe incremental detokenization (tokenizers + jinja2)."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from llmc.errors import ArtifactError

REPLACEMENT = "\ufffd"


class Tokenizer:
    def __init__(self, directory: str | Path, generation: dict):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(f"{directory} has no tokenizer.json; rebuild the artifact.")
        self._tok = HFTokenizer.from_file(str(path))
        self.chat_template: str | None = generation.get("chat_template")
        self.special_tokens: dict = generation.get("special_tokens", {})
        self.eos_token_ids: list[int] = list(generation.get("eos_token_ids", []))
        self.pad_token_id: int = generation.get("pad_token_id") or 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None
    ) -> str:
        """The prompt text, rendered as transformers renders it (`tools`: JSON schemas)."""
        if not self.chat_template:
            raise ArtifactError("this model has no chat template; pass a plain prompt instead.")
        return _compile_template(self.chat_template).render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # Templates write their own special tokens, so none are added here (as transformers does).
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    """The chat template compiled once per source (SmolLM2's takes 4.5 ms to compile, and a
    server renders it for every request on its event loop); a compiled template renders from
    any thread."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(Extension):
        tags = {"generation"}  # `{% generation %}...{% endgeneration %}` renders its body

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)  # fmt: skip

    # transformers' environment: loop controls, and `{% generation %}` (its assistant mask) kept
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Detokenizer:
    """Turns a growing token list into text pieces that never split a multi-byte character and
    never show a stop string (or the start of one that may still complete).

    Incremental: each token decodes only a short window of the ids (from the last emitted
    boundary), so a long generation costs O(new text) per token, not a decode of everything so
    far. The window's first token is decoded in both halves of the difference, so a tokenizer
    that treats a sequence's first token specially (a leading space dropped) gives the same text
    as decoding all the ids at once."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self._tok = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.decoded = ""  # the text of ids[:_read]
        self.text = ""  # what has been emitted (a prefix of `decoded`)
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of `decoded`
        self._read = 0

    def push(self, token: int) -> str:
        """Add a token; return the new text that is safe to show (possibly empty)."""
        self.ids.append(token)
        known = self._tok.decode(self.ids[self._prefix : self._read])
        window = self._tok.decode(self.ids[self._prefix :])
        if len(window) <= len(known) or window.endswith(REPLACEMENT):
            return ""  # no new text yet, or an incomplete UTF-8 sequence: wait for more bytes
        self.decoded += window[len(known) :]
        self._prefix, self._read = self._read, len(self.ids)
        for s in self._stop:
            at = self.decoded.find(s, max(0, len(self.text) - len(s)))
            if at != -1:
                self.stopped = True
                return self._emit(self.decoded[:at])
        return self._emit(self.decoded[: len(self.decoded) - self._held_back(self.decoded)])

    def flush(self) -> str:
        """The rest of the text at the end of generation."""
        if self.stopped:
            return ""
        known = self._tok.decode(self.ids[self._prefix : self._read])
        rest = self._tok.decode(self.ids[self._prefix :])[len(known) :]
        return self._emit(self.decoded + rest)

    def _held_back(self, full: str) -> int:
        """Length of the longest suffix of `full` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:n]):
                    best = max(best, n)
                    break
        return best

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        piece = upto[len(self.text) :]
        self.text = upto
        return piece
