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
        budget = min(config.max_new_tokens, self.session.max_context - width)
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

    # -- text API --------------------------------------------------------------------------------
    def stream(self, prompt: Prompt, chat: bool = False, **kwargs) -> Iterator[str]:
        """Yield text pieces as they are generated (UTF-8 safe, stop strings never shown)."""
        config = _config(**kwargs)
        detok = Detokenizer(self.tokenizer, list(config.stop))
        eos = set(self.tokenizer.eos_token_ids)
        for nxt in self.generate_ids([self.encode(prompt, chat)], config):
            token = int(nxt[0])
            if token in eos and not config.ignore_eos:
                break
            piece = detok.push(token)
            if piece:
                yield piece
            if detok.stopped:
                return
        tail = detok.flush()
        if tail:
            yield tail

    def generate(self, prompt: Prompt, chat: bool = False, **kwargs) -> str:
        return "".join(self.stream(prompt, chat=chat, **kwargs))

    def generate_batch(self, prompts: list[Prompt], chat: bool = False, **kwargs) -> list[str]:
        config = _config(**kwargs)
        encoded = [self.encode(p, chat) for p in prompts]
        detoks = [Detokenizer(self.tokenizer, list(config.stop)) for _ in prompts]
        finished = [False] * len(prompts)
        eos = set(self.tokenizer.eos_token_ids)
        for nxt in self.generate_ids(encoded, config):
            for row, token in enumerate(nxt.tolist()):
                if finished[row]:
                    continue
                if token in eos and not config.ignore_eos:
                    finished[row] = True
                    continue
                detoks[row].push(token)
                finished[row] = detoks[row].stopped
            if all(finished):
                break
        for d in detoks:
            d.flush()
        return [d.text for d in detoks]


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
