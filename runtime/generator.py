"""The Generator shared by every target: prompts in, tokens and text out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from llmc.errors import ContextLengthError, LlmcError
from llmc.runtime.sampling import Sampler, SamplingParams
from llmc.runtime.session import Session
from llmc.runtime.tokenizer import Detokenizer, Tokenizer

Prompt = str | list[dict] | list[int]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    sampling: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # every token sampled, the end-of-sequence token included

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class StepEvent:
    """One step of one sequence: the token sampled and the text it made visible (possibly
    empty: UTF-8 safe, a stop string never shown). The sequence's last event says why it
    finished, "stop" (a stop string), "eos" (an end-of-sequence token) or "length"
    (max_new_tokens or the artifact's context), with its token counts."""

    token: int
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


class Generator:
    def __init__(self, session: Session, tokenizer: Tokenizer, manifest: dict):
        self.session = session
        self.tokenizer = tokenizer
        self.manifest = manifest

    # -- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """A string (raw, or through the chat template with chat=True), messages, or token ids."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, list):
            ids = self.tokenizer.encode_chat(prompt)
        elif chat:
            ids = self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        else:
            ids = self.tokenizer.encode(prompt)
        if not ids:
            raise LlmcError("the prompt is empty; give at least one token of text.")
        if len(ids) >= self.session.max_context:
            raise ContextLengthError(
                f"the prompt is {len(ids)} tokens but the artifact's context is "
                f"{self.session.max_context}; shorten the prompt."
            )
        return ids

    # -- token loop ------------------------------------------------------------------------------
    def generate_ids(
        self, prompts: list[list[int]], config: GenerationConfig
    ) -> Iterator[np.ndarray]:
        """Yield the next token of every row, step by step; rows that finished repeat their pad.

        Prompts of different lengths are left-padded and masked."""
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = np.full((batch, width), pad, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = p
            mask[row, width - len(p) :] = 1
        history = [np.asarray(p, dtype=np.int64) for p in prompts]
        sampler = Sampler(config.sampling)
        eos = set() if config.ignore_eos else set(self.tokenizer.eos_token_ids)
        done = np.zeros(batch, dtype=bool)
        budget = self._budget(config, width)
        logits = self.session.prefill(ids, mask)
        for step in range(budget):
            nxt = sampler(logits, history)
            nxt = np.where(done, pad, nxt)
            yield nxt
            for row in range(batch):
                history[row] = np.append(history[row], nxt[row])
            done |= np.isin(nxt, list(eos))
            if done.all() or step == budget - 1:
                return
            logits = self.session.decode(nxt[:, None])

    # -- events and text ---------------------------------------------------------------------
    def events(self, prompt: Prompt, chat: bool = False, **kwargs) -> Iterator[StepEvent]:
        """The step events of one prompt (sampling options as for `generate`)."""
        for step in self.events_batch([prompt], chat=chat, **kwargs):
            yield step[0]

    def events_batch(
        self, prompts: list[Prompt], chat: bool = False, **kwargs
    ) -> Iterator[list[StepEvent | None]]:
        """Per step, one event per prompt (None once that prompt has finished); every prompt
        ends with an event that has a finish reason."""
        config = _config(**kwargs)
        encoded = [self.encode(p, chat) for p in prompts]
        detoks = [Detokenizer(self.tokenizer, list(config.stop)) for _ in prompts]
        eos = set() if config.ignore_eos else set(self.tokenizer.eos_token_ids)
        budget = self._budget(config, max(len(p) for p in encoded))
        finished = [False] * len(prompts)
        for step, nxt in enumerate(self.generate_ids(encoded, config)):
            events: list[StepEvent | None] = [None] * len(prompts)
            for row, token in enumerate(nxt.tolist()):
                if finished[row]:
                    continue
                detok = detoks[row]
                if token in eos:
                    text, reason = detok.flush(), "eos"
                else:
                    text = detok.push(token)
                    reason = "stop" if detok.stopped else None
                    if reason is None and step == budget - 1:
                        text, reason = text + detok.flush(), "length"
                usage = Usage(len(encoded[row]), step + 1) if reason else None
                events[row] = StepEvent(token, text, reason, usage)
                finished[row] = reason is not None
            yield events
            if all(finished):
                return

    def stream(self, prompt: Prompt, chat: bool = False, **kwargs) -> Iterator[str]:
        """Yield text pieces as they are generated (UTF-8 safe, stop strings never shown)."""
        for event in self.events(prompt, chat=chat, **kwargs):
            if event.text:
                yield event.text

    def generate(self, prompt: Prompt, chat: bool = False, **kwargs) -> str:
        return "".join(self.stream(prompt, chat=chat, **kwargs))

    def generate_batch(self, prompts: list[Prompt], chat: bool = False, **kwargs) -> list[str]:
        texts = [""] * len(prompts)
        for events in self.events_batch(prompts, chat=chat, **kwargs):
            for row, event in enumerate(events):
                if event is not None:
                    texts[row] += event.text
        return texts

    def _budget(self, config: GenerationConfig, width: int) -> int:
        """New tokens a batch whose longest prompt has `width` tokens gets."""
        return min(config.max_new_tokens, self.session.max_context - width)


def _config(
    max_new_tokens: int = 128, stop=(), ignore_eos: bool = False, **sampling
) -> GenerationConfig:
    if max_new_tokens < 1:
        raise LlmcError("max_new_tokens must be at least 1.")
    if isinstance(stop, str):
        stop = (stop,)
    try:
        params = SamplingParams(**sampling)
    except (TypeError, ValueError) as exc:
        raise LlmcError(f"invalid sampling option: {exc}.") from exc
    return GenerationConfig(max_new_tokens, tuple(stop), ignore_eos, params)
