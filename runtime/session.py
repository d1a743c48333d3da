"""The Session protocol every target implements, and shared position/mask bookkeeping."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from llmc.errors import ContextLengthError


class Session(Protocol):
    """One sequence batch's model state: prefill a prompt batch, then decode one token at a time."""

    max_context: int
    vocab_size: int

    def reset(self) -> None: ...

    def prefill(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """ids [B, S] (left-padded; mask 0 on padding) -> logits of the last position [B, V]."""

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """ids [B, 1] -> logits [B, V]."""

    def score(self, ids: np.ndarray) -> np.ndarray:
        """ids [S] of one sequence, on a fresh cache -> logits at every position [S, V]
        (perplexity). The cache is left holding the sequence."""


class PositionTracker:
    """The attention mask and position ids of a left-padded batch as it grows."""

    def __init__(self, max_context: int):
        self.max_context = max_context
        self.mask: np.ndarray | None = None  # [B, T] int64

    def reset(self) -> None:
        self.mask = None

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def extend(self, new_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append the new tokens' mask; return (full mask [B, T], new positions [B, S])."""
        new_mask = new_mask.astype(np.int64)
        total = self.length + new_mask.shape[1]
        if total > self.max_context:
            raise ContextLengthError(
                f"the sequence needs {total} positions but the artifact's context is "
                f"{self.max_context}; shorten the prompt or lower max_new_tokens."
            )
        self.mask = new_mask if self.mask is None else np.concatenate([self.mask, new_mask], 1)
        positions = np.cumsum(self.mask, axis=1) - 1
        positions = np.where(self.mask == 0, 1, positions)  # padding: any valid position
        return self.mask, positions[:, -new_mask.shape[1] :]
