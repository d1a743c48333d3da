"""The bookkeeping of a shared-mode KV cache kept in slots: one [slots, KV heads, capacity, D]
tensor per layer and kind, written by the model at each row's positions, every row holding its
tokens from position 0, so a row's length is all the cache needs (truncating rewinds it). Rows
of a prompt batch prefill one by one in their slots (no padding), rows joining a running batch
take the next slots, leaving rows are compacted; slots and capacity grow by doubling. A target's
sequence (TVM's, AOTInductor's) adds the tensors: how to allocate them, run a step on some of
their slots, and move rows."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from llmc.runtime.session import Sequence, token_bytes

MIN_CAPACITY = 256  # positions a fresh cache holds before it first doubles


class SlotSequence(Sequence):
    """Rows in slots of shared KV buffers; see the module's docstring."""

    def __init__(self, model):
        super().__init__(model)
        self._len = np.zeros(0, np.int64)  # tokens each live row holds
        self._buffers: list | None = None  # 2 * layers tensors [slots, KVH, capacity, D]

    @property
    def _slots(self) -> int:
        return 0 if self._buffers is None else int(self._buffers[0].shape[0])

    @property
    def _capacity(self) -> int:
        return 0 if self._buffers is None else int(self._buffers[0].shape[2])

    # -- what a target provides -----------------------------------------------------------------
    @abstractmethod
    def _resize(self, slots: int, capacity: int, live: int, held: int) -> None:
        """New buffers of `slots` rows and `capacity` positions, holding the first `held`
        positions of the first `live` rows of the old ones."""

    @abstractmethod
    def _run(self, first: int, ids: np.ndarray, start: np.ndarray, last_only: bool) -> np.ndarray:
        """One step of ids [B, S] on slots first..first+B, after `start` [B] tokens -> logits."""

    @abstractmethod
    def _compact(self, keep: np.ndarray) -> None:
        """Move the rows `keep` (slot indices, in order) to the first slots."""

    # -- the protocol ---------------------------------------------------------------------------
    def _reserve(self, rows: int, positions: int) -> None:
        """Buffers with at least `rows` slots and `positions` positions, grown by doubling;
        what the live rows hold is kept."""
        slots, capacity = max(self._slots, 1), max(self._capacity, MIN_CAPACITY)
        while slots < rows:
            slots *= 2
        while capacity < positions:
            capacity *= 2
        capacity = min(capacity, self.max_context)
        if self._slots and (slots, capacity) == (self._slots, self._capacity):
            return
        self._resize(slots, capacity, len(self._len), int(self._len.max(initial=0)))

    def _extend(self, ids: np.ndarray, mask: np.ndarray | None, last_only: bool) -> np.ndarray:
        b, s = ids.shape
        if len(self._len) == 0:  # a prefill: rows of different lengths go one by one
            self._len = np.zeros(b, np.int64)
            if mask is not None and not mask.all():
                rows = [row[m == 1] for row, m in zip(ids, mask, strict=True)]
                self._reserve(b, max(len(r) for r in rows))
                logits = [self._prefill_row(i, r, last_only) for i, r in enumerate(rows)]
                return np.concatenate(logits)
        self._reserve(b, int(self._len.max()) + s)
        logits = self._run(0, ids, self._len, last_only)
        self._len = self._len + s
        return logits

    def _prefill_row(self, slot: int, row: np.ndarray, last_only: bool) -> np.ndarray:
        logits = self._run(slot, row[None], np.zeros(1, np.int64), last_only)
        self._len[slot] = len(row)
        return logits

    def _truncate(self, lengths: np.ndarray) -> None:
        self._len = lengths.astype(np.int64)

    def _lengths(self) -> np.ndarray:
        return self._len.copy()

    def _reset(self) -> None:
        self._len = np.zeros(0, np.int64)

    def _add(self, rows: list[np.ndarray]) -> np.ndarray:
        live = len(self._len)
        self._reserve(live + len(rows), max(int(self._len.max()), *map(len, rows)))
        self._len = np.concatenate([self._len, np.zeros(len(rows), np.int64)])
        return np.concatenate(
            [self._prefill_row(live + i, r, True)[:, -1] for i, r in enumerate(rows)]
        )

    def _remove(self, keep: np.ndarray) -> None:
        self._compact(keep)
        self._len = self._len[keep]

    def _release(self) -> None:
        self._buffers = None

    def _kv_bytes(self) -> int:
        return self._slots * self._capacity * token_bytes(self.model.io.cache)
