"""The Generator shared by every target: prompts in, tokens and text out."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from llmc.artifact_checks import reason
from llmc.errors import ArtifactError, ContextLengthError, LlmcError
from llmc.runtime import checks
from llmc.runtime.drafters import drafter_for
from llmc.runtime.sampling import Sampler, SamplingParams
from llmc.runtime.session import Model, Sequence
from llmc.runtime.speculative import (
    VERIFY_COST,
    DraftPolicy,
    RowStats,
    StepClock,
    draft_sizes,
    padded,
    verify_row,
)
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
    """Token counts of one finished sequence. steps: the model's forward passes after the
    prompt's (one per token without a draft); drafted/accepted: speculative tokens proposed and
    kept."""

    prompt_tokens: int
    completion_tokens: int  # every token sampled, the end-of-sequence token included
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

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
    """Text generation over one loaded model: every call runs on a sequence of its own (reused
    from a pool afterwards), so one generator serves many threads on one copy of the weights."""

    def __init__(self, model: Model, tokenizer: Tokenizer, manifest: dict):
        self.model = model
        self.tokenizer = tokenizer
        self.manifest = manifest
        self._idle: list[Sequence] = []
        self._lock = threading.Lock()

    @contextmanager
    def sequence(self) -> Iterator[Sequence]:
        """A sequence of this model for one generation, returned to the pool afterwards."""
        with self._lock:
            seq = self._idle.pop() if self._idle else None
        seq = seq or self.model.sequence()
        try:
            yield seq
        finally:
            seq.reset()
            with self._lock:
                self._idle.append(seq)

    # -- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """A string (raw, or through the chat template with chat=True), messages, or token ids."""
        kind = checks.prompt_kind(prompt)
        if kind == "ids":
            ids = checks.token_ids(prompt, self.model.vocab_size)
        elif kind == "messages":
            ids = self._encode_chat(checks.messages(prompt))
        elif chat:
            ids = self._encode_chat([{"role": "user", "content": prompt}])
        else:
            ids = self._encode_text(prompt)
        if not ids:
            raise LlmcError("the prompt is empty; give at least one token of text.")
        if len(ids) >= self.model.max_context:
            raise ContextLengthError(
                f"the prompt is {len(ids)} tokens but the artifact's context is "
                f"{self.model.max_context}; shorten the prompt."
            )
        return ids

    def _encode_text(self, text: str) -> list[int]:
        """A huge text is refused on a prefix that alone overflows the context (tokenizing 10 MB
        takes 20 s); others are tokenized whole."""
        context, prefix = self.model.max_context, 16 * self.model.max_context
        if len(text) > prefix and len(self.tokenizer.encode(text[:prefix])) > context + 1:
            raise ContextLengthError(
                f"the prompt is longer than the artifact's context of {context} tokens (its "
                f"first {prefix} characters alone are); shorten the prompt."
            )
        return self.tokenizer.encode(text)

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            return self.tokenizer.encode_chat(messages)
        except ArtifactError:
            raise
        except Exception as exc:  # the template's own raise_exception, or what it stumbled on
            why = reason(exc, 200)
            raise LlmcError(f"the chat template cannot render these messages: {why}.") from None

    # -- token loop ------------------------------------------------------------------------------
    def generate_ids(
        self, prompts: list[list[int]], config: GenerationConfig
    ) -> Iterator[np.ndarray]:
        """Yield the next token of every row, step by step (no draft); rows that finished
        repeat their pad. Prompts of different lengths are left-padded and masked."""
        pad = self.tokenizer.pad_token_id
        for new in self.token_steps(prompts, config):
            yield np.array([tokens[0] if tokens else pad for tokens in new], np.int64)

    def token_steps(
        self,
        prompts: list[list[int]],
        config: GenerationConfig,
        drafter=None,
        num_draft: int = 0,
        stats: list[RowStats] | None = None,
    ) -> Iterator[list[list[int]]]:
        """Per model step, the new tokens of every row ([] once it finished): one each, or with
        a drafter, the accepted drafted tokens and one of the model's (speculative.py)."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = np.full((batch, width), pad, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
        rows = _Rows(prompts, config, self._budget(config, width), self.tokenizer)
        stats = stats if stats is not None else [RowStats() for _ in prompts]
        sampler = Sampler(config.sampling)
        clock = StepClock(VERIFY_COST + drafter.cost) if drafter else None
        policies = [DraftPolicy(num_draft, clock) for _ in prompts] if drafter else []
        with self.sequence() as seq:
            logits = seq.prefill(ids, mask)
            sizes = draft_sizes(seq.extend_sizes) if batch == 1 else None
            for policy in policies:
                policy.sizes = sizes
            if drafter:
                drafter.start(prompts)
            new = [[int(t)] for t in sampler(logits, rows.history)]
            while True:
                yield rows.take(new)
                if all(rows.done):
                    return
                last = rows.last(pad)
                ks = []  # tokens to draft per row (none without a drafter)
                if drafter and not clock.uncalibrated():  # else a plain step: the clock's unit
                    ks = [0 if rows.done[b] else min(p.choose(), rows.left(b) - 1)
                          for b, p in enumerate(policies)]  # fmt: skip
                    if any(ks):
                        room = self.model.max_context - int(seq.lengths.max()) - 1
                        ks = [min(k, room) for k in ks]
                started = time.perf_counter()
                drafts = drafter.propose(rows.history, ks, sampler) if any(ks) else []
                if not any(len(d.tokens) for d in drafts):
                    logits = seq.step(last)
                    if clock:
                        clock.plain(time.perf_counter() - started)
                    picked = sampler(logits, rows.history).tolist()
                    new = [[] if d else [t] for d, t in zip(rows.done, picked, strict=True)]
                    for row, done in zip(stats, rows.done, strict=True):
                        row.steps += not done
                    if drafter and any(rows.done):  # finished rows must not outgrow the rest
                        seq.truncate(seq.lengths - np.array(rows.done))
                    continue
                new = _verify(seq, drafts, last, rows, sampler, policies, stats)
                drafter.commit([max(len(kept) - 1, 0) for kept in new])
                k = max(len(d.tokens) for d in drafts)
                clock.speculative(time.perf_counter() - started, padded(k, sizes))

    # -- events and text ---------------------------------------------------------------------
    def events(self, prompt: Prompt, chat: bool = False, **kwargs) -> Iterator[StepEvent]:
        """The step events of one prompt (options as for `generate`)."""
        for step in self.events_batch([prompt], chat=chat, **kwargs):
            yield step[0]

    def events_batch(
        self,
        prompts: list[Prompt],
        chat: bool = False,
        draft=None,
        num_draft: int | None = None,
        **kwargs,
    ) -> Iterator[list[StepEvent | None]]:
        """Per token, one event per prompt (None where that prompt has no token: it finished,
        or a speculative step gave it fewer); every prompt ends with an event that has a finish
        reason. draft: "prompt-lookup" or a loaded draft generator (speculative decoding, at
        most `num_draft` tokens drafted per step)."""
        config = _config(**kwargs)
        encoded = [self.encode(p, chat) for p in checks.prompt_list(prompts)]
        num_draft = checks.num_draft(num_draft)
        drafter, limit = drafter_for(draft, self, num_draft) if draft is not None else (None, 0)
        budget = self._budget(config, max(len(p) for p in encoded))
        streams = [TextStream(self.tokenizer, config, len(p), budget) for p in encoded]
        stats = [s.stats for s in streams]
        for new in self.token_steps(encoded, config, drafter, limit, stats):
            for i in range(max(len(tokens) for tokens in new)):
                events: list[StepEvent | None] = [None] * len(prompts)
                for row, tokens in enumerate(new):
                    if not streams[row].finished and i < len(tokens):
                        events[row] = streams[row].push(tokens[i])
                yield events
                if all(s.finished for s in streams):
                    return

    def stream(self, prompt: Prompt, chat: bool = False, **kwargs) -> Iterator[str]:
        """Yield text pieces as they are generated (UTF-8 safe, stop strings never shown)."""
        for event in self.events(prompt, chat=chat, **kwargs):
            if event.text:
                yield event.text

    def generate(self, prompt: Prompt, chat: bool = False, **kwargs) -> str:
        return "".join(self.stream(prompt, chat=chat, **kwargs))

    def generate_batch(self, prompts: list[Prompt], chat: bool = False, **kwargs) -> list[str]:
        prompts = checks.prompt_list(prompts)
        texts = [""] * len(prompts)
        for events in self.events_batch(prompts, chat=chat, **kwargs):
            for row, event in enumerate(events):
                if event is not None:
                    texts[row] += event.text
        return texts

    def _budget(self, config: GenerationConfig, width: int) -> int:
        """New tokens a batch whose longest prompt has `width` tokens gets."""
        return min(config.max_new_tokens, self.model.max_context - width)


class TextStream:
    """One row's tokens turned into its step events: incremental text, the end at an
    end-of-sequence token, a stop string or its budget of new tokens, and the usage counts."""

    def __init__(self, tokenizer: Tokenizer, config: GenerationConfig, prompt: int, budget: int):
        self.detok = Detokenizer(tokenizer, list(config.stop))
        self.eos = set() if config.ignore_eos else set(tokenizer.eos_token_ids)
        self.prompt, self.budget = prompt, budget
        self.produced = 0
        self.finished = False
        self.stats = RowStats()

    def push(self, token: int) -> StepEvent:
        self.produced += 1
        if token in self.eos:
            text, reason = self.detok.flush(), "eos"
        else:
            text = self.detok.push(token)
            reason = "stop" if self.detok.stopped else None
            if reason is None and self.produced >= self.budget:
                text, reason = text + self.detok.flush(), "length"
        self.finished = reason is not None
        return StepEvent(token, text, reason, self.usage() if reason else None)

    def usage(self) -> Usage:
        s = self.stats
        return Usage(self.prompt, self.produced, s.steps, s.drafted, s.accepted)


def _verify(seq, drafts, last, rows, sampler, policies, stats) -> list[list[int]]:
    """One speculative step: extend every row by its last token and its draft (rows with a
    shorter draft padded with their last token), keep each row's accepted tokens and the
    model's next one, and roll the cache back past the rest."""
    block = np.repeat(last[:, None], 1 + max(len(d.tokens) for d in drafts), axis=1)
    for b, d in enumerate(drafts):
        block[b, 1 : 1 + len(d.tokens)] = d.tokens
    held = seq.lengths
    logits = seq.extend(block)
    new, accepted = [], np.zeros(len(drafts), np.int64)
    for b, d in enumerate(drafts):
        if rows.done[b]:
            new.append([])
            continue
        kept = verify_row(logits[b, : len(d.tokens) + 1], d, rows.history[b], sampler)
        ends = [i for i, token in enumerate(kept) if token in rows.eos]
        kept = kept[: ends[0] + 1] if ends else kept  # nothing after an end of sequence
        accepted[b] = len(kept) - 1
        new.append(kept)
        stats[b].steps += 1
        stats[b].drafted += len(d.tokens)
        stats[b].accepted += len(kept) - 1
        policies[b].update(len(d.tokens), len(kept) - 1)
    done = np.array(rows.done)
    seq.truncate(np.where(done, held, held + 1 + accepted))  # finished rows: no growth
    return new


class _Rows:
    """Each row's tokens so far and whether it finished (end-of-sequence or its budget). The
    counts are Python lists, not arrays: a decode step reads them on caches the model's weights
    have just swept, where each small numpy operation costs tens of microseconds."""

    def __init__(self, prompts: list[list[int]], config: GenerationConfig, budget: int, tok):
        self.history = [np.asarray(p, dtype=np.int64) for p in prompts]
        self.produced = [0] * len(prompts)
        self.done = [False] * len(prompts)
        self.budget = budget
        self.eos = set() if config.ignore_eos else set(tok.eos_token_ids)

    def left(self, row: int) -> int:
        return self.budget - self.produced[row]

    def last(self, pad: int) -> np.ndarray:
        """Each row's last token, `pad` for finished rows [B]."""
        pairs = zip(self.done, self.history, strict=True)
        return np.array([pad if done else h[-1] for done, h in pairs], np.int64)

    def take(self, new: list[list[int]]) -> list[list[int]]:
        """Keep each row's new tokens up to an end-of-sequence token and its budget."""
        kept = []
        for b, tokens in enumerate(new):
            tokens = [] if self.done[b] else tokens[: self.left(b)]
            for i, token in enumerate(tokens):
                if token in self.eos:
                    tokens = tokens[: i + 1]
                    self.done[b] = True
                    break
            self.history[b] = np.concatenate([self.history[b], np.asarray(tokens, np.int64)])
            self.produced[b] += len(tokens)
            self.done[b] = self.done[b] or self.produced[b] >= self.budget
            kept.append(tokens)
        return kept


def _config(
    max_new_tokens: int = 128, stop=(), ignore_eos: bool = False, **sampling
) -> GenerationConfig:
    max_new_tokens = checks.max_new_tokens(max_new_tokens)
    stop = checks.stop_strings(stop)
    try:
        params = SamplingParams(**sampling)
    except (TypeError, ValueError) as exc:
        raise LlmcError(f"invalid sampling option: {exc}.") from exc
    return GenerationConfig(max_new_tokens, tuple(stop), ignore_eos, params)
