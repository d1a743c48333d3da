"""Perplexity of a text under any session, with strided windows (numpy only).

The text's tokens are cut into windows of `window` tokens that start `stride` tokens apart; each
window is scored on a fresh cache and contributes only the tokens the previous window did not
score, so every token after the first is predicted exactly once, with at least
`window - stride` tokens of context (except at the start; with stride == window the windows do not
overlap and each one's first token is not scored). The same function scores every target
and PyTorch itself, so the numbers are comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    window: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window over n tokens."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got {window}, {stride}")
    out, scored = [], 1  # the first token has no prediction
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + window, n)
        first = max(scored, begin + 1)  # a window's first token has no context in it
        if end > first:
            out.append((begin, end, first))
            scored = end
        if end == n:
            break
    return out


def perplexity(
    score: Callable[[np.ndarray], np.ndarray],
    ids: np.ndarray,
    window: int,
    stride: int,
    progress: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """`score(ids [S]) -> logits [S, V]` on a fresh cache; ids: the whole text's tokens."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        raise ValueError("perplexity needs a text of at least two tokens")
    spans = windows(len(ids), window, stride)
    total, count = 0.0, 0
    for i, (begin, end, first) in enumerate(spans):
        logits = np.asarray(score(ids[begin:end]), dtype=np.float64)
        rows = logits[first - 1 - begin : end - 1 - begin]  # predictions of ids[first:end]
        top = rows.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(rows - top).sum(axis=-1)) + top[:, 0]
        targets = ids[first:end]
        total += float((log_z - rows[np.arange(len(targets)), targets]).sum())
        count += len(targets)
        if progress:
            progress(i + 1, len(spans))
    nll = total / count
    return Perplexity(float(np.exp(nll)), nll, count, len(spans), window, stride)
