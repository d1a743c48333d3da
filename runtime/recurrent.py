"""Sequences of a state-space model (Mamba): a fixed-size recurrent state per row instead of a KV
cache (llmc/contract.py, `recurrent` mode). Any target whose model runs one step of the graph
(`run(feeds, names) -> arrays`) gets prefill, extend, rollback and continuous batching from here
(numpy only; never torch).

- A step of more than `step_tokens` positions (a long prompt) runs in chunks of that many, the
  state carried from one to the next.
- Rolling back (`truncate`) cannot be computed from a recurrent state: the state after position t
  does not hold the one before it. A sequence therefore keeps the state from before each of its
  last `rollback` steps (the arrays the graph returned, not copies) with the tokens each step
  fed; a rollback restores the newest state from before the cut and feeds the kept tokens again.
  By default the last step can be rolled back (speculative verification, finished rows); a draft
  model keeps more (`keep_rollback`). A rollback past what is kept is a SessionError.
- Rows joining a running batch are prefilled alone and their states stacked under the others';
  rows leaving are cut out. Rows never need padding after their prefill: every state has the
  same size, whatever its row's length.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from llmc.errors import SessionError
from llmc.runtime.session import Sequence, left_pad

Run = Callable[[dict, list], list]


class RecurrentSequence(Sequence):
    def __init__(self, model, run: Run):
        super().__init__(model)
        self._run = run
        self._geometry = model.io.cache
        self._inputs = set(model.io.inputs)
        self._names = ["logits", *model.io.present_outputs]
        self._state: list[np.ndarray] | None = None  # in past_inputs order
        self._held = np.zeros(0, np.int64)  # real tokens per row
        self._log: deque = deque(maxlen=1)  # (held before, state before, ids) of recent steps

    def keep_rollback(self, steps: int) -> None:
        """Keep what rolling back up to `steps` steps needs (a draft model's sequence)."""
        self._log = deque(self._log, maxlen=max(1, steps))

    # -- one call of the graph, in chunks ----------------------------------------------------------
    def _step(self, ids, mask, state, last_only: bool):
        """ids [B, S] on `state` -> (logits [B, 1 or S, V], the state after them)."""
        step = self._geometry.step_tokens
        width = ids.shape[1]
        kept = []
        for at in range(0, width, step):
            chunk = ids[:, at : at + step]
            s, final = chunk.shape[1], at + step >= width
            index = np.array([s - 1]) if last_only else np.arange(s)
            feeds = {
                "input_ids": chunk,
                "attention_mask": np.ones_like(chunk) if mask is None else mask[:, at : at + step],
                "logits_index": index.astype(np.int64),
            }
            feeds = {k: v for k, v in feeds.items() if k in self._inputs}
            feeds.update(zip(self.model.io.past_inputs, state, strict=True))
            logits, *state = self._run(feeds, self._names)
            if not last_only or final:
                kept.append(logits[:, -1:] if last_only else logits)
        return (kept[0] if len(kept) == 1 else np.concatenate(kept, axis=1)), state

    def _zeros(self, rows: int) -> list[np.ndarray]:
        dtype = np.dtype(self._geometry.dtype)
        return [np.zeros(shape, dtype) for shape in self._geometry.shapes(rows)]

    # -- the Sequence protocol ---------------------------------------------------------------
    def _reset(self) -> None:
        self._state, self._held = None, np.zeros(0, np.int64)
        self._log.clear()

    def _lengths(self) -> np.ndarray:
        return self._held

    def _extend(self, ids: np.ndarray, mask: np.ndarray | None, last_only: bool) -> np.ndarray:
        if self._state is None:
            state, held = self._zeros(ids.shape[0]), np.zeros(ids.shape[0], np.int64)
        else:
            state, held = self._state, self._held
            self._log.append((held, state, ids))
        logits, self._state = self._step(ids, mask, state, last_only)
        added = ids.shape[1] if mask is None else mask.sum(axis=1)
        self._held = held + added
        return logits

    def _truncate(self, lengths: np.ndarray) -> None:
        state = [s.copy() for s in self._state]
        entries = list(self._log)
        for b in np.flatnonzero(lengths < self._held):
            # the newest step that started at or before the cut, and the tokens fed since
            start = next((i for i in reversed(range(len(entries)))
                          if entries[i][0][b] <= lengths[b]), None)  # fmt: skip
            if start is None:
                raise SessionError(
                    f"a recurrent state rolls back at most {self._log.maxlen} step(s) (row {b} "
                    f"holds {self._held[b]} tokens, asked {lengths[b]}): it keeps no state "
                    "from further back."
                )
            before, saved, _ = entries[start]
            fed = np.concatenate([ids[b] for _, _, ids in entries[start:]])
            replay = fed[: lengths[b] - before[b]]
            row = [s[b : b + 1] for s in saved]
            if replay.size:
                _, row = self._step(replay[None], None, row, last_only=True)
            for mine, new in zip(state, row, strict=True):
                mine[b] = new[0]
        self._state = state
        self._held = lengths.copy()
        self._log.clear()  # the steps it held no longer end where this sequence is

    def _add(self, rows: list[np.ndarray]) -> np.ndarray:
        ids, mask = left_pad(rows)
        logits, state = self._step(ids, mask, self._zeros(len(rows)), last_only=True)
        self._state = [np.concatenate(pair) for pair in zip(self._state, state, strict=True)]
        self._held = np.concatenate([self._held, mask.sum(axis=1)])
        self._log.clear()
        return logits[:, -1]

    def _remove(self, keep: np.ndarray) -> None:
        self._state = [np.ascontiguousarray(s[keep]) for s in self._state]
        self._held = self._held[keep]
        self._log.clear()

    def _kv_bytes(self) -> int:
        return sum(s.nbytes for s in self._state) if self._state is not None else 0
