"""Next-token selection on numpy logits: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            _number(name, getattr(self, name))
        _integer("top_k", self.top_k)
        if self.seed is not None:
            _integer("seed", self.seed)
            if self.seed < 0:
                raise ValueError("seed must be >= 0 (or None)")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 turns it off)")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0 (1 turns it off)")


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {_show(value)}")


def _integer(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, not {_show(value)}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty: logits of tokens already in the sequence are divided (if positive) or
    multiplied (if negative) by `penalty`. logits [V], seen [N] token ids."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    ids = np.unique(seen)
    values = logits[ids]
    logits[ids] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampled from, after temperature, top-k and top-p. logits [V] -> p [V].
    Shifted before scaling, so that a tiny temperature (or a penalty that overflowed a logit to
    infinity) still gives a distribution: the most likely token's probability 1."""
    logits = np.nan_to_num(logits.astype(np.float64), nan=-np.inf, posinf=np.finfo(np.float64).max)
    scaled = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = cumulative - p[order] < params.top_p  # always keeps the most likely token
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.greedy = params.temperature == 0
        self.greedy_plain = self.greedy and params.repetition_penalty == 1.0  # argmax alone
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[np.ndarray]) -> np.ndarray:
        """logits [B, V], history: per row the ids seen so far -> next ids [B]."""
        if self.greedy_plain:
            return np.argmax(logits, axis=-1)  # every row at once: a step's hot path
        out = np.empty(logits.shape[0], dtype=np.int64)
        for row, (row_logits, seen) in enumerate(zip(logits, history, strict=False)):
            out[row] = self.pick(row_logits, seen)
        return out

    def pick(self, logits: np.ndarray, seen: np.ndarray) -> int:
        """The next id of one row: logits [V], seen [N]."""
        if self.greedy:
            return int(
                np.argmax(apply_repetition_penalty(logits, seen, self.params.repetition_penalty))
            )
        return self.draw(self.distribution(logits, seen))

    def distribution(self, logits: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """What sampling draws one row's next id from [V] (not for greedy)."""
        logits = apply_repetition_penalty(logits, seen, self.params.repetition_penalty)
        return probabilities(logits, self.params)

    def draw(self, p: np.ndarray) -> int:
        return int(self._rng.choice(p.size, p=p))

    def uniform(self) -> float:
        return float(self._rng.random())
