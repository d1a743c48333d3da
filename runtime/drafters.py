"""Drafters for speculative decoding (runtime/speculative.py): prompt lookup, which drafts from
the text itself, and a draft model, a smaller llmc artifact with the same tokenizer. Each has
`start(prompts)`, `propose(histories, ks, sampler) -> [Draft]`, `commit(accepted)` and a `cost`
per drafted token relative to a target decode step."""

from __future__ import annotations

import dataclasses

import numpy as np

from llmc.contract import Logits
from llmc.errors import LlmcError
from llmc.runtime.sampling import Sampler
from llmc.runtime.speculative import MAX_DRAFT, Draft

NUM_DRAFT = {"prompt-lookup": 15, "model": 4}  # default most tokens drafted per step
CATCH_UP = 16  # tokens a draft model takes per step when it catches up (its decode kernels)
# Prompt lookup weighs the latest CANDIDATES occurrences of an n-gram by how many of the CONTEXT
# tokens before each agree with the text's own (PromptLookup).
CANDIDATES, CONTEXT = 64, 32
# It drafts past where another occurrence continues differently only if the chosen one's context
# agrees TRUSTED tokens or more, or RIVAL tokens longer than the other's (_contested).
TRUSTED, RIVAL = 4, 4


class PromptLookup:
    """Drafts the tokens that followed an earlier occurrence of the sequence's last n tokens (n
    from `max_ngram` down to `min_ngram`), in the prompt or the text so far: of those whose
    continuation is as long as asked (else the longest), the one whose preceding tokens agree
    longest with the text's, the latest of equals. In a text that copies a passage with edits,
    that is the place being copied, where a short n-gram alone (`self.`, an indent) also
    matches everywhere else. Each row keeps an index of where every n-gram started, updated
    with the tokens added since the last step, so a lookup costs a few dictionary reads and one
    comparison of CONTEXT tokens per candidate."""

    cost = 0.0  # per drafted token, relative to a target decode step

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._index: list[dict[tuple, list[int]]] = []
        self._seen: list[int] = []  # tokens of each row indexed so far

    def start(self, prompts: list[list[int]]) -> None:
        self._index = [{} for _ in prompts]
        self._seen = [0] * len(prompts)

    def propose(self, histories: list[np.ndarray], ks: list[int], sampler: Sampler) -> list[Draft]:
        if len(self._index) != len(histories):
            self.start(histories)
        drafts = []
        for row, (history, k) in enumerate(zip(histories, ks, strict=True)):
            self._update(row, history)
            drafts.append(Draft(self._lookup(row, history, k)))
        return drafts

    def lookup(self, history: np.ndarray, k: int) -> np.ndarray:
        """The draft for one sequence on its own."""
        self.start([history])
        self._update(0, history)
        return self._lookup(0, history, k)

    def _update(self, row: int, history: np.ndarray) -> None:
        index, tokens = self._index[row], history.tolist()
        for end in range(self._seen[row] + 1, len(tokens) + 1):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    index.setdefault(tuple(tokens[end - n : end]), []).append(end - n)
        self._seen[row] = len(tokens)

    def _lookup(self, row: int, history: np.ndarray, k: int) -> np.ndarray:
        size = len(history)
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            if k <= 0:
                break
            starts = self._index[row].get(tuple(history[size - n :].tolist()), [])[:-1]
            if starts:  # every earlier occurrence but the tail itself, oldest first
                at = np.array(starts[-CANDIDATES:], np.int64)[::-1]  # latest first
                room = np.minimum(k, size - at - n)
                agree = _context(history, at, size - n)
                best = np.lexsort((-agree, -room))[0]  # the longest, then best agreeing
                draft = history[at[best] + n : at[best] + n + k]
                return draft[: _contested(history, at + n, room, agree, best, draft)].copy()
        return np.zeros(0, np.int64)

    def commit(self, accepted: list[int]) -> None:
        pass


def _contested(history, starts, room, agree, best: int, draft: np.ndarray) -> int:
    """How much of `draft` (what follows the chosen occurrence, `best` of `starts`) to propose.
    All of it where the chosen occurrence's context agrees with the text's for TRUSTED tokens or
    more, or where no other occurrence with as much room and a context about as long (within
    RIVAL tokens) continues differently; else up to where the first such one parts from it.
    Where a short n-gram recurs with several continuations and no context tells them apart (a
    line that begins like many others), the draft is a guess, and a long wrong draft costs a
    long verification step for nothing. Occurrences cut short by the text's end are left out:
    in a text that repeats itself they overlap the tail and say nothing new."""
    if agree[best] >= TRUSTED or not len(draft):
        return len(draft)
    # the chosen one has the most room (PromptLookup._lookup): rivals have as much
    rivals = np.flatnonzero((agree + RIVAL > agree[best]) & (room == room[best]))
    rivals = rivals[rivals != best]
    if not len(rivals):
        return len(draft)
    differs = history[starts[rivals, None] + np.arange(len(draft))] != draft
    return int(np.where(differs.any(axis=1), differs.argmax(axis=1), len(draft)).min())


def _context(history: np.ndarray, starts: np.ndarray, end: int) -> np.ndarray:
    """For each n-gram occurrence at `starts`, how many of the tokens before it equal those
    before the tail's occurrence at `end` (up to CONTEXT): in a text that copies a passage, the
    occurrence at the passage's place agrees the longest."""
    back = np.arange(1, CONTEXT + 1)
    before = starts[:, None] - back  # [m, CONTEXT] positions before each occurrence
    ours = end - back
    same = (before >= 0) & (ours >= 0)
    same &= history[np.maximum(before, 0)] == history[np.maximum(ours, 0)]
    return np.cumprod(same, axis=1).sum(axis=1)


class DraftModel:
    """Drafts with a second llmc model (a smaller artifact with the same tokenizer, e.g. one
    built with `llmc build --draft-layers N`): its own sequence follows the accepted text."""

    def __init__(self, generator, target):
        draft, tok = generator.tokenizer, target.tokenizer
        probe = "The quick brown fox, 3.14 <tags> naïve — 日本語"
        if generator.model.vocab_size != target.model.vocab_size or tok.encode(
            probe
        ) != draft.encode(probe):
            raise LlmcError(
                "the draft artifact has another tokenizer than the model; build the draft from "
                "the same model (llmc build --draft-layers N) or one of its family."
            )
        self.model = _quiet(generator)
        weights = sum(f.stat().st_size for f in self.model.directory.iterdir() if f.is_file())
        ours = sum(f.stat().st_size for f in target.model.directory.iterdir() if f.is_file())
        self.cost = weights / max(ours, 1)  # decode is memory-bound: cost follows the bytes
        self.seq = self.model.sequence()
        # it rolls back its drafts after a verification, and its catch-up steps after those
        self.seq.keep_rollback(MAX_DRAFT + 2)
        self._fed: np.ndarray | None = None  # tokens of each row in the draft's cache
        self._off = False  # the prompts do not fit the draft's context
        self._base: list[int] = []

    def start(self, prompts: list[list[int]]) -> None:
        """Prefill the prompts with the model's (prompt work, before the first token); a draft
        whose context cannot hold them drafts nothing."""
        width = max(len(p) for p in prompts)
        self._off = width >= self.model.max_context
        if self._off:
            return
        ids = np.zeros((len(prompts), width), np.int64)
        mask = np.zeros_like(ids)
        for b, prompt in enumerate(prompts):
            ids[b, width - len(prompt) :], mask[b, width - len(prompt) :] = prompt, 1
        self.seq.prefill(ids, mask)
        self._fed = np.array([len(p) for p in prompts], np.int64)

    def propose(self, histories: list[np.ndarray], ks: list[int], sampler: Sampler) -> list[Draft]:
        if self._off:
            return [Draft(np.zeros(0, np.int64)) for _ in histories]
        behind = max(len(h) - f for h, f in zip(histories, self._fed, strict=True))
        reach = int(self._fed.max()) + behind  # the catch-up pads every row to the same length
        room = self.model.max_context - max(reach, max(len(h) for h in histories))
        k = min(max(ks), room)
        self._base = [len(h) for h in histories]
        if k <= 0:
            return [Draft(np.zeros(0, np.int64)) for _ in histories]
        logits = self._catch_up(histories)
        tokens = np.zeros((len(histories), k), np.int64)
        probs = None if sampler.greedy else np.zeros((len(histories), k, logits.shape[-1]))
        seen = [h for h in histories]
        for step in range(k):
            for b, row in enumerate(logits):
                if probs is None:
                    tokens[b, step] = sampler.pick(row, seen[b])
                else:
                    probs[b, step] = sampler.distribution(row, seen[b])
                    tokens[b, step] = sampler.draw(probs[b, step])
                seen[b] = np.append(seen[b], tokens[b, step])
            if step < k - 1:
                logits = self.seq.decode(tokens[:, step : step + 1])
                self._fed += 1
        return [
            Draft(tokens[b, :n], None if probs is None else probs[b, :n])
            for b, n in enumerate(min(kb, k) for kb in ks)
        ]

    def _catch_up(self, histories: list[np.ndarray]) -> np.ndarray:
        """Feed each row what the draft has not seen; the logits after its last token [B, V].
        Rows with as many tokens to feed (one row: always) go in steps short enough for the
        decode kernels, computing only the last position's logits."""
        missing = [h[f:] for h, f in zip(histories, self._fed, strict=True)]
        counts = np.array([len(m) for m in missing])
        width = max(counts)
        # a finished row has nothing new: it repeats its last token, which is then cut again
        rows = [np.pad(m if len(m) else h[-1:], (0, width - max(len(m), 1)), mode="edge")
                for m, h in zip(missing, histories, strict=True)]  # fmt: skip
        if (counts == width).all():
            block = np.stack(rows)
            for at in range(0, width, CATCH_UP):
                last = self.seq.extend(block[:, at : at + CATCH_UP], last_only=True)[:, -1]
        else:
            logits = self.seq.extend(np.stack(rows))
            last = logits[np.arange(len(missing)), np.maximum(counts - 1, 0)]
        self._fed = self._fed + counts
        self.seq.truncate(self._fed)
        return last

    def commit(self, accepted: list[int]) -> None:
        """The target kept `accepted[b]` drafted tokens: forget the draft's later ones."""
        if not self._base or self._off:
            return
        keep = np.minimum(self._fed, np.array(self._base) + np.array(accepted))
        self.seq.truncate(keep)
        self._fed = keep


def _quiet(generator):
    """The generator's model with idle threads that do not spin (SessionOptions.spin), opened
    again once per generator if it spins."""
    model = generator.model
    if model.spins and model.options.spin:
        if getattr(generator, "_draft_model", None) is None:
            options = {**dataclasses.asdict(model.options), "spin": False}
            manifest = generator.manifest
            generator._draft_model = type(model).open(model.directory, manifest, **options)
        model = generator._draft_model
    return model


def drafter_for(draft, target, num_draft: int | None):
    """The drafter of `draft` and its draft limit: "prompt-lookup", a loaded Generator, or any
    object with PromptLookup's methods (start, propose, commit) and a `cost`."""
    if isinstance(draft, str):
        if draft != "prompt-lookup":
            raise LlmcError(
                f"draft={draft!r}: use 'prompt-lookup' or a loaded draft artifact (rt.load(DIR))."
            )
        drafter, default = PromptLookup(), NUM_DRAFT["prompt-lookup"]
    elif hasattr(draft, "model") and hasattr(draft, "tokenizer"):
        drafter, default = DraftModel(draft, target), NUM_DRAFT["model"]
    elif all(hasattr(draft, name) for name in ("start", "propose", "commit", "cost")):
        drafter, default = draft, NUM_DRAFT["model"]  # a drafter of the caller's (as above)
    else:
        raise LlmcError("draft must be 'prompt-lookup' or a generator from rt.load(DRAFT_DIR).")
    if num_draft is not None and not 1 <= num_draft <= MAX_DRAFT:
        raise LlmcError(
            f"num_draft must be from 1 to {MAX_DRAFT} (longer steps leave the decode kernels)."
        )
    if target.model.io.logits is Logits.LAST:
        raise LlmcError(
            f"{target.model.directory} computes logits for the last position only (a --compat "
            "build, or an older one); build it without --compat for speculative decoding."
        )
    return drafter, num_draft or default
