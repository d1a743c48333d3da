"""Speculative decoding: drafters that propose tokens, the rule that accepts them, and the policy
that picks how many to draft (numpy only).

A step feeds the target the row's last token and k drafted ones (`Sequence.extend`), reads the
logits at every position, accepts a prefix of the draft and adds one token of the target's own,
then rolls the cache back past what was rejected (`Sequence.truncate`).

- Greedy: a drafted token is accepted while it is the target's argmax, so the output is the
  plain greedy output token for token.
- Sampling: the rule of Leviathan et al. (2023) and Chen et al. (2023): accept x with
  probability min(1, p(x) / q(x)), else draw from the normalized max(p - q, 0), and draw a bonus
  token from p when every draft was accepted. The output is distributed as plain sampling from
  p. A prompt-lookup draft is deterministic (q is one-hot on x).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from llmc.contract import Logits
from llmc.errors import LlmcError
from llmc.runtime.sampling import Sampler

NUM_DRAFT = {"prompt-lookup": 15, "model": 4}  # default most tokens drafted per step
# Prior cost of a verification step per drafted token, as a fraction of a decode step (the
# StepClock measures the real one): the weights are read once per step whatever its length, so
# on a memory-bound CPU each extra position adds little.
VERIFY_COST = 0.06
CATCH_UP = 16  # tokens a draft model takes per step when it catches up (its decode kernels)
MAX_DRAFT = 15  # a verification step of 16 tokens at most runs on the decode kernels
# Prompt lookup weighs the latest CANDIDATES occurrences of an n-gram by how many of the CONTEXT
# tokens before each agree with the text's own (PromptLookup).
CANDIDATES, CONTEXT = 64, 32
# It drafts past where another occurrence continues differently only if the chosen one's context
# agrees TRUSTED tokens or more, or RIVAL tokens longer than the other's (_contested).
TRUSTED, RIVAL = 4, 4


@dataclass
class Draft:
    tokens: np.ndarray  # [n] int64
    probs: np.ndarray | None = None  # [n, V] the draft's distributions (None: deterministic)


@dataclass
class RowStats:
    drafted: int = 0  # tokens proposed
    accepted: int = 0  # of which the target kept
    steps: int = 0  # target steps after the prefill (decode or verify)


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


class StepClock:
    """What the steps of one generation cost, measured as it runs: the decode step's time, and
    a speculative step's (drafting and verifying k tokens) in decode steps, fitted as
    1 + overhead + per_token * k by decayed least squares. The overhead is what a verification
    costs beyond a decode (rolling a cache back, a back end moving its state between compiled
    models, a draft model catching up); per_token is each position's share (a few percent on a
    memory-bound fp32 model, 20% for OpenVINO's int8 kernels on SmolLM2). Two pseudo-steps of
    the drafter's prior start the fit."""

    def __init__(self, per_token: float, overhead: float = 0.1, decay: float = 0.9):
        self.decode: float | None = None  # seconds, decayed average
        self._blind = 0  # speculative steps taken before any decode step was timed
        self.decay = decay
        self._sums = np.zeros(5)  # weight, sum k, sum k^2, sum r, sum k r
        for k in (1, 8):
            self._add(k, overhead + per_token * k)

    def _add(self, k: int, r: float) -> None:
        self._sums = self.decay * self._sums + np.array([1, k, k * k, r, k * r])
        self._fit: tuple[float, float] | None = None
        self._costs: list[float] = []

    def plain(self, seconds: float) -> None:
        self.decode = seconds if self.decode is None else 0.8 * self.decode + 0.2 * seconds

    def speculative(self, seconds: float, k: int) -> None:
        if self.decode:
            self._add(k, seconds / self.decode - 1)
        else:
            self._blind += 1

    def uncalibrated(self) -> bool:
        """Whether a plain step is due: no decode step has been timed after 4 verifications."""
        return self.decode is None and self._blind >= 4

    def costs(self, limit: int) -> list[float]:
        """`cost` of 0..limit drafted tokens as a list, kept until the next speculative step
        changes the fit: a plain step's choice reads it in pure Python."""
        if len(self._costs) != limit + 1:
            self._costs = self.cost(np.arange(limit + 1)).tolist()
        return self._costs

    def cost(self, ks: np.ndarray) -> np.ndarray:
        """Decode steps a step drafting each of `ks` tokens costs (k = 0: a decode step)."""
        if self._fit is None:
            n, sk, skk, sr, skr = self._sums
            det = n * skk - sk * sk
            per_token = max((n * skr - sk * sr) / det, 0.01) if det > 1e-9 else VERIFY_COST
            self._fit = (max((sr - per_token * sk) / n, 0.0), per_token)
        overhead, per_token = self._fit
        return 1 + (ks > 0) * (overhead + per_token * ks)


@dataclass
class DraftPolicy:
    """How many tokens to draft for one row: the k that maximizes the expected tokens per unit
    of time, from an estimate of the per-token acceptance rate (decayed counts of accepted and
    rejected drafts) and the measured step costs (StepClock). When no k beats plain decoding,
    the row decodes plainly and drafts one token after `probe` steps times what such a step
    costs, to keep the estimate current; each probe that fails doubles the wait (up to 64)."""

    limit: int
    clock: StepClock
    accepted: float = 1.0  # prior: one accepted draft, one rejected
    rejected: float = 1.0
    idle: int = 0
    probe: int = 8
    decay: float = 0.85

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def choose(self) -> int:
        """In pure Python: it runs before every step, where numpy's first calls after a model
        step cost tens of microseconds each (Sequence.step)."""
        a = min(self.rate, 0.999)
        costs = self.clock.costs(self.limit)
        k, best, expected, power = 0, 0.0, 0.0, 1.0
        for n, cost in enumerate(costs):  # expected tokens: 1 + a + ... + a^n
            expected += power
            power *= a
            if expected / cost > best:
                k, best = n, expected / cost
        if k == 0:
            self.idle += 1
            if self.idle >= self.probe * costs[1 if len(costs) > 1 else 0]:  # dearer: rarer
                self.idle, k = 0, 1
        return k

    def update(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.accepted = self.decay * self.accepted + accepted
            self.rejected = self.decay * self.rejected + (accepted < drafted)
            if drafted == 1:  # a probe
                self.probe = 8 if accepted else min(2 * self.probe, 64)


def verify_row(logits: np.ndarray, draft: Draft, seen: np.ndarray, sampler: Sampler) -> list[int]:
    """The tokens one row keeps after a verification step: the accepted prefix of `draft` and
    one token of the target's. logits [n + 1, V]: the target's at the row's last token and at
    each drafted one; `seen`: the row's tokens so far (for the repetition penalty)."""
    out: list[int] = []
    n = len(draft.tokens)
    for i in range(n + 1):
        history = np.concatenate([seen, np.asarray(out, np.int64)])
        if sampler.greedy:
            token = sampler.pick(logits[i], history)
            out.append(token)
            if i == n or token != draft.tokens[i]:
                return out
            continue
        p = sampler.distribution(logits[i], history)
        if i == n:
            out.append(sampler.draw(p))
            return out
        x = int(draft.tokens[i])
        q = None if draft.probs is None else draft.probs[i]
        qx = 1.0 if q is None else q[x]
        if sampler.uniform() * qx < p[x]:  # accept with probability min(1, p(x) / q(x))
            out.append(x)
            continue
        residual = p.copy()
        if q is None:
            residual[x] = 0.0
        else:
            residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        out.append(sampler.draw(residual / total if total > 0 else p))
        return out
    return out
