"""Speculative decoding: the rule that accepts drafted tokens and the policy that picks how many
to draft (numpy only); the drafters that propose them are in runtime/drafters.py.

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

import math
from dataclasses import dataclass

import numpy as np

from llmc.runtime.sampling import Sampler

# Prior cost of a verification step per drafted token, as a fraction of a decode step (the
# StepClock measures the real one): the weights are read once per step whatever its length, so
# on a memory-bound CPU each extra position adds little.
VERIFY_COST = 0.06
MAX_DRAFT = 15  # a verification step of 16 tokens at most runs on the decode kernels


@dataclass
class Draft:
    tokens: np.ndarray  # [n] int64
    probs: np.ndarray | None = None  # [n, V] the draft's distributions (None: deterministic)


@dataclass
class RowStats:
    drafted: int = 0  # tokens proposed
    accepted: int = 0  # of which the target kept
    steps: int = 0  # target steps after the prefill (decode or verify)


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
    the row decodes plainly and drafts the fewest tokens a step takes (one, or the smallest of
    `sizes`) after `probe` steps times what such a step costs, to keep the estimate current;
    each probe that fails doubles the wait (up to 64). A probe the drafter has nothing for
    costs nothing and is tried again at the next step. `sizes`: where the sequence pads short
    verification steps (Sequence.extend_sizes), the draft lengths that fill one; a shorter
    draft would cost as much and bring less."""

    limit: int
    clock: StepClock
    sizes: tuple[int, ...] | None = None
    accepted: float = 1.0  # prior: one accepted draft, one rejected
    rejected: float = 1.0
    idle: float = math.inf  # decode steps since the last draft (inf: the first one probes)
    probe: int = 8
    decay: float = 0.85
    probing: bool = False  # the step being chosen is a probe

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def choose(self) -> int:
        """In pure Python: it runs before every step, where numpy's first calls after a model
        step cost tens of microseconds each (Sequence.step)."""
        a = min(self.rate, 0.999)
        costs = self.clock.costs(self.limit)
        k, best, expected, power = 0, 0.0, 0.0, 1.0
        sizes, self.probing = self.sizes, False
        for n, cost in enumerate(costs):  # expected tokens: 1 + a + ... + a^n
            expected += power
            power *= a
            if expected / cost > best and (not n or not sizes or n in sizes or n == self.limit):
                k, best = n, expected / cost
        if k:
            self.idle = 0
        elif self.limit:
            self.idle += 1
            fewest = min(sizes[0], self.limit) if sizes else 1
            if self.idle >= self.probe * costs[fewest]:  # dearer: rarer
                k, self.probing = fewest, True  # until a draft comes of it (update)
        return k

    def update(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.accepted = self.decay * self.accepted + accepted
            self.rejected = self.decay * self.rejected + (accepted < drafted)
            if self.probing:
                self.idle, self.probe = 0, 8 if accepted else min(2 * self.probe, 64)


def draft_sizes(extend_sizes: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The draft lengths that fill a verification step of one of `extend_sizes` tokens (the
    row's last token and the draft), or None for any (a shorter draft is padded to the next
    size and costs as much)."""
    return None if extend_sizes is None else tuple(s - 1 for s in extend_sizes)


def padded(k: int, sizes: tuple[int, ...] | None) -> int:
    """The draft length a step of `k` drafted tokens costs as (k itself where nothing pads)."""
    return next((s for s in sizes if s >= k), k) if sizes and k else k


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
