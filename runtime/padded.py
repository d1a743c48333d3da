"""Caches of left-padded rows: the attention mask and position ids of a batch as it grows
(`PositionTracker`), and what continuous batching needs of a cache kept as one
[B, KV heads, T, head dim] tensor per name under such a mask: rows joining and leaving
(`PaddedRows`), and the bookkeeping of a cache the runtime feeds back as the next step's past
(`ConcatRows`). Targets mix these into their `Sequence`s (numpy only; never torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from llmc.runtime.session import check_context, left_pad, token_bytes

if TYPE_CHECKING:
    from llmc.runtime.session import Model, Sequence


class PaddedRows:
    """Continuous batching for a sequence whose cache is one [B, KV heads, T, head dim] tensor
    per name with a PositionTracker mask (a left-padded batch): new rows are prefilled on a
    helper sequence of the same model and joined to the batch, left-padded to a common length;
    removed rows are cut out with the columns no row keeps any more. A target mixes it in and
    gives `_states()` (name -> array) and `_load_states(states)`."""

    _positions: PositionTracker
    _joiner: Sequence | None = None

    def _add(self, rows: list[np.ndarray]) -> np.ndarray:
        if self._joiner is None:
            self._joiner = self.model.sequence()
        joiner = self._joiner
        logits = joiner.prefill(*left_pad(rows))
        mine, theirs = self._positions.mask, joiner._positions.mask
        width = max(mine.shape[1], theirs.shape[1])
        ours, new = self._states(), joiner._states()
        states = {n: _join(ours[n], new[n], width, 2) for n in ours}
        self._positions.mask = _join(mine, theirs, width, 1)
        joiner.reset()
        self._load_states(states)
        return logits

    def _kv_bytes(self) -> int:
        return self._positions.mask.size * token_bytes(self.model.io.cache)

    def _remove(self, keep: np.ndarray) -> None:
        self._positions.mask = self._positions.mask[keep]
        columns = self._positions.compact()
        self._load_states(
            {n: np.ascontiguousarray(s[keep][:, :, columns]) for n, s in self._states().items()}
        )


class ConcatRows(PaddedRows):
    """A concat-mode cache the runtime feeds back each step: one [B, KV heads, T, head dim]
    array per past input (`_past`, None before a prefill) with a PositionTracker mask. A
    target's sequence mixes it in (with Sequence) and implements only `_extend`."""

    def _start_concat(self, model: Model) -> None:
        self._positions = PositionTracker(model.max_context)
        self._past: list[np.ndarray] | None = None
        cache = model.io.cache
        self._empty = (cache.kv_heads, cache.head_dim, np.dtype(cache.dtype))

    def _empty_past(self, rows: int) -> list[np.ndarray]:
        heads, dim, dtype = self._empty
        return [np.zeros((rows, heads, 0, dim), dtype)] * len(self.model.io.past_inputs)

    def _reset(self) -> None:
        self._positions.reset()
        self._past = None

    def _lengths(self) -> np.ndarray:
        return self._positions.lengths

    def _truncate(self, lengths: np.ndarray) -> None:
        cut = self._positions.truncate(lengths)
        self._past = [p[:, :, :cut] for p in self._past]

    def _states(self) -> dict[str, np.ndarray]:
        return dict(zip(self.model.io.past_inputs, self._past, strict=True))

    def _load_states(self, states: dict[str, np.ndarray]) -> None:
        self._past = [states[name] for name in self.model.io.past_inputs]


def _join(first: np.ndarray, second: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Two batches stacked, each left-padded with zeros along `axis` to `width`."""
    return np.concatenate([_pad_left(first, width, axis), _pad_left(second, width, axis)])


def _pad_left(array: np.ndarray, width: int, axis: int = 2) -> np.ndarray:
    """Zeros before `array` along `axis` up to `width` (a cache's time axis, or a mask's)."""
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (missing, 0)
    return np.pad(array, pad)


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
        held = 0 if self.mask is None else int(self.lengths.max())
        check_context(held + new_mask.shape[1], self.max_context)
        self.mask = new_mask if self.mask is None else np.concatenate([self.mask, new_mask], 1)
        positions = np.cumsum(self.mask, axis=1) - 1
        positions = np.where(self.mask == 0, 1, positions)  # padding: any valid position
        return self.mask, positions[:, -new_mask.shape[1] :]

    def truncate(self, lengths: np.ndarray, drop: bool = True) -> int:
        """Keep each row's first `lengths[b]` tokens: later ones are masked out and, with
        `drop`, the trailing columns no row keeps are cut. Returns the columns left (the caches
        keep that many)."""
        counts = np.cumsum(self.mask, axis=1)
        keep = (self.mask == 1) & (counts <= lengths[:, None])
        cut = int(np.flatnonzero(keep.any(axis=0))[-1]) + 1 if drop else keep.shape[1]
        self.mask = keep[:, :cut].astype(np.int64)
        return cut

    def compact(self) -> np.ndarray:
        """Drop the columns no row keeps; returns the indices of those left."""
        columns = np.flatnonzero(self.mask.any(axis=0))
        self.mask = self.mask[:, columns]
        return columns

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(axis=1)
