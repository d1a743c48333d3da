"""The `shared` KV mode of ONNX artifacts: one buffer per layer, [slots, kv_heads, capacity,
head_dim], owned here and bound through onnxruntime I/O binding as both the past input and the
present output, so GroupQueryAttention writes each step's keys and values in place. A decode
step copies no cache and allocates nothing: its inputs live in preallocated arrays and its
binding is reused. Every row's positions are its cache indices (no left padding). Prompts that
fit one chunk are prefilled together, right-padded (onnxruntime's CPU GroupQueryAttention takes
a batched first prompt, each row ending at its seqlens_k); longer ones row by row (it takes a
multi-token step with a cache for one row only), in chunks (a causal prompt's later chunks
attend to the earlier ones through the cache, which skips the masked half of the score matrix;
the model says how long). Rows of a running batch are slots of the buffers: rows joining it
take the next slots (continuous batching).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llmc.runtime.session import Sequence, check_context
from llmc.targets.onnx.rescore import rescore_positions

CAPACITY_STEP = 256  # buffer positions are reserved in multiples of this


class SharedKVSequence(Sequence):
    """Shared-buffer KV cache written in place by the model (see the module docstring)."""

    def __init__(self, model):
        super().__init__(model)
        io = model.io
        self._kv = (io.cache.kv_heads, io.cache.head_dim, np.dtype(io.cache.dtype))
        # [slots, KV heads, capacity, head dim] per past input; row b of the batch is slot b
        self._buffers: list[np.ndarray] = []
        self._held: np.ndarray | None = None  # tokens in the cache, per row
        self._decoders: dict[int, _Bound] = {}  # decode steps' bindings, by rows; reused
        self._bound: dict[tuple, _Bound] = {}  # short extend steps' bindings, by row and length

    @property
    def capacity(self) -> int:
        return self._buffers[0].shape[2] if self._buffers else 0

    def _reset(self) -> None:
        self._held = None

    def _lengths(self) -> np.ndarray:
        return self._held.copy()

    def _truncate(self, lengths: np.ndarray) -> None:
        self._held = lengths.copy()  # the model reads each row's first `held` positions only

    def _kv_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    def _extend(self, ids: np.ndarray, mask: np.ndarray | None, last_only: bool) -> np.ndarray:
        """Rows run one by one (see the module docstring), long ones in chunks."""
        live = self._held is not None
        if live and ids.shape[1] == 1 and last_only:
            return self._decode(ids)[:, None]
        mask = np.ones_like(ids) if mask is None else mask
        rows = [ids[b][mask[b] != 0] for b in range(ids.shape[0])]
        starts = self._held if live else np.zeros(len(rows), np.int64)
        out = self._fill(rows, starts, 0, last_only, ids.shape[1], live, False)
        self._held = starts + np.array([len(r) for r in rows], np.int64)
        return out

    def _add(self, rows: list[np.ndarray]) -> np.ndarray:
        """New rows take the slots after the live ones, each prefilled alone."""
        first = len(self._held)
        width = max(len(r) for r in rows)
        logits = self._fill(rows, np.zeros(len(rows), np.int64), first, True, width, False, True)
        self._held = np.concatenate([self._held, [len(r) for r in rows]]).astype(np.int64)
        return logits[:, -1]

    def _remove(self, keep: np.ndarray) -> None:
        """The kept rows' caches move up to the first slots; a buffer far longer than what is
        left shrinks, so that a sequence holds about what its rows hold."""
        for buffer in self._buffers:
            buffer[: len(keep)] = buffer[keep]
        self._held = self._held[keep]
        needed = int(self._held.max()) + 1
        if 2 * _rounded(needed, self.model.max_context) <= self.capacity:
            self._resize(len(keep), needed)

    def _fill(self, rows, starts, first: int, last_only, width: int, live: bool, join: bool):
        """Run each row b of `rows` after its `starts[b]` cached tokens in slot first + b ->
        logits [n, 1 if last_only else width, V]. `join`: rows joining a running batch."""
        m = self.model
        ends = starts + np.array([len(r) for r in rows], np.int64)
        check_context(int(ends.max()), m.max_context)
        self._reserve(first + len(rows), int(ends.max()) + 1)
        longest, tokens = max(len(r) for r in rows), sum(len(r) for r in rows)
        sess, rescore = m.session_for(width, live, join, tokens)
        chunk = m.chunk if sess is m.prefill_session else width
        if (
            not live
            and last_only
            and len(rows) > 1
            and m.io.logits_index
            and longest <= chunk
            and len(rows) * longest <= 2 * tokens  # padding at most doubles the work
        ):
            return self._prompts(rows, first, sess, rescore)
        out = np.empty((len(rows), 1 if last_only else width, m.vocab_size), np.float32)
        for b, row in enumerate(rows):
            for at in range(0, len(row), chunk):
                piece = row[None, at : at + chunk]
                start, slot = int(starts[b]) + at, first + b
                logits = self._run(piece, start, slot, last_only, sess, rescore)
                if not last_only:  # copied once, before a later piece's run reuses the binding
                    out[b, at : at + piece.shape[1]] = logits[0]
            if last_only:
                out[b] = logits[0, -1:]
        return out

    def _prompts(self, rows: list[np.ndarray], first: int, sess, rescore) -> np.ndarray:
        """Fresh prompts (no cache yet) of slots first.. in one step, right-padded: onnxruntime's
        CPU GroupQueryAttention takes a batched first prompt whose rows end at their seqlens_k
        (each row's logits and the decode steps after them are bit-identical to the row's alone;
        the padding's keys and values lie past the row's length, where its next tokens go).
        The distinct last positions are computed for every row -> [n, 1, V]."""
        n, width = len(rows), max(len(r) for r in rows)
        ids = np.zeros((n, width), np.int64)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = row
        positions = np.tile(np.arange(width, dtype=np.int64), (n, 1))
        last = np.array([len(r) - 1 for r in rows], np.int64)
        index = np.unique(last)
        rows_at = slice(first, first + n)
        bound = self._binding(sess, ids, positions, last.astype(np.int32), index, rows_at, rescore)
        self._bind_mask(bound)
        self.model.run(sess, bound.binding)
        picked = np.searchsorted(index, last)
        out = bound.logits[np.arange(n), picked][:, None].copy()  # [n, 1, V]
        if rescore:
            rescore(out[:, 0], bound.hidden[np.arange(n), picked])
        return out

    def step(self, last: np.ndarray) -> np.ndarray:
        return self._decode(last[:, None], copy=False)

    def _decode(self, ids: np.ndarray, copy: bool = True) -> np.ndarray:
        m = self.model
        check_context(int(self._held.max()) + 1, m.max_context)
        self._reserve(len(ids), int(self._held.max()) + 1)
        bound = self._decoders.get(len(ids))
        if bound is None:
            bound = self._decoders[len(ids)] = self._bind_decode(len(ids))
        bound.ids[:] = ids
        bound.positions[:, 0] = self._held
        bound.seqlens[:] = self._held  # the row's length after this step, minus one
        self._bind_mask(bound)
        # Counted before the run: after it, the first numpy operation costs ~80 us (the weights
        # have swept numpy's code and data out of the caches), the view kept in `bound` nothing.
        self._held += 1
        try:
            m.run(m.decode_session, bound.binding)
        except BaseException:
            self._held -= 1
            raise
        out = bound.last.copy() if copy else bound.last
        if m.rescore:
            m.rescore(out, bound.hidden[:, -1])
        return out

    # -- buffers and bindings --------------------------------------------------------------------
    def _reserve(self, rows: int, needed: int) -> None:
        """Make the buffers hold `needed` positions in `rows` slots, keeping what they hold."""
        slots = self._buffers[0].shape[0] if self._buffers else 0
        if slots >= rows and self.capacity >= needed:
            return
        if self._held is None:  # a fresh batch: exactly its rows
            self._resize(max(rows, slots), needed, keep=0)
            return
        if slots < rows:  # rows joining a live batch: room for more, so that joins rarely copy
            slots = max(rows, min(2 * slots, rows + slots))
        self._resize(slots, max(needed, 2 * self.capacity if needed > self.capacity else 0))

    def _resize(self, slots: int, needed: int, keep: int | None = None) -> None:
        """New buffers of `slots` rows and `needed` positions (rounded up), holding the first
        `keep` rows of the old ones (all the live rows by default)."""
        capacity = _rounded(needed, self.model.max_context)
        heads, dim, dtype = self._kv
        keep = len(self._held) if keep is None else keep
        old = self._buffers
        shape = (slots, heads, capacity, dim)
        self._buffers = [np.zeros(shape, dtype) for _ in self.model.io.past_inputs]
        cols = min(capacity, old[0].shape[2]) if old else 0
        for new, previous in zip(self._buffers, old, strict=False):
            new[:keep, :, :cols] = previous[:keep, :, :cols]
        self._decoders.clear()
        self._bound.clear()

    def _release(self) -> None:
        self._buffers = []
        self._decoders.clear()
        self._bound.clear()

    def _bind_arrays(self, binding, rows: slice) -> None:
        io = self.model.io
        for past, present, buffer in zip(
            io.past_inputs, io.present_outputs, self._buffers, strict=True
        ):
            view = buffer[rows]  # a contiguous block: rows are the outermost dim
            for bind, name in ((binding.bind_input, past), (binding.bind_output, present)):
                bind(name, "cpu", 0, view.dtype, list(view.shape), view.ctypes.data)

    def _bind_input(self, binding, name: str, array: np.ndarray) -> None:
        if name in self.model.inputs:
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def _bind_mask(self, bound: _Bound) -> None:
        """A graph in onnxruntime-genai's form (--compat) takes `attention_mask` [B, T] and
        computes seqlens_k from it: row b's first seqlens_k[b] + 1 columns are ones."""
        if self.model.io.mask_input:
            width = int(bound.seqlens.max()) + 1
            bound.mask = (np.arange(width) <= bound.seqlens[:, None]).astype(np.int64)
            self._bind_input(bound.binding, "attention_mask", bound.mask)

    def _run(self, ids, start: int, row: int, last_only: bool, sess, rescore) -> np.ndarray:
        """One step of `ids` [1, S] of row `row` after `start` cached tokens -> logits
        [1, 1 or S, V]: a view of the binding's output (a short step's binding is reused)."""
        s = ids.shape[1]
        key = (row, s, last_only, sess is self.model.decode_session)
        bound = self._bound.get(key)  # a short step's binding is kept and refilled
        if bound is None:
            positions, seqlens = np.zeros((1, s), np.int64), np.zeros(1, np.int32)
            index = np.array([s - 1], np.int64) if last_only else np.arange(s, dtype=np.int64)
            ids_in = np.zeros((1, s), np.int64)
            rows = slice(row, row + 1)
            bound = self._binding(sess, ids_in, positions, seqlens, index, rows, rescore)
            if s <= self.model.short_extend:
                self._bound[key] = bound
        bound.ids[:] = ids
        bound.positions[0] = start + np.arange(s)
        bound.seqlens[0] = start + s - 1
        self._bind_mask(bound)
        self.model.run(sess, bound.binding)
        if rescore:
            rescore_positions(rescore, bound.logits, bound.hidden)
        return bound.logits[:, -1:] if last_only else bound.logits  # valid until its next run

    def _bind_decode(self, batch: int):
        """The decode binding: its inputs are arrays the caller fills in place each step."""
        ids, positions = np.zeros((batch, 1), np.int64), np.zeros((batch, 1), np.int64)
        index = np.zeros(1, np.int64)
        seqlens = np.zeros(batch, np.int32)
        m, rows = self.model, slice(0, batch)
        return self._binding(m.decode_session, ids, positions, seqlens, index, rows, m.rescore)

    def _binding(self, sess, ids, positions, seqlens, index, rows: slice, rescore) -> _Bound:
        """Bind inputs, the rows' KV buffers (as past and present), a logits array and, with a
        rescorer, an array for the lm_head's input."""
        m = self.model
        if m.io.logits_index:
            kept = len(index)
        else:
            kept = 1 if m.last_only else ids.shape[1]
        logits = np.empty((ids.shape[0], kept, m.vocab_size), np.float32)
        binding = sess.io_binding()
        self._bind_input(binding, "input_ids", ids)
        self._bind_input(binding, "position_ids", positions)
        self._bind_input(binding, "seqlens_k", seqlens)
        self._bind_input(binding, "logits_index", index)
        self._bind_arrays(binding, rows)
        binding.bind_output(
            "logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data
        )
        hidden = None
        if rescore:
            hidden = np.empty((ids.shape[0], kept, rescore.k), np.float32)
            binding.bind_output(
                rescore.output, "cpu", 0, hidden.dtype, list(hidden.shape), hidden.ctypes.data
            )
        return _Bound(binding, ids, positions, seqlens, index, logits, hidden)


def _rounded(positions: int, max_context: int) -> int:
    """Buffer positions for `positions`: a multiple of CAPACITY_STEP, at most the context."""
    return min(max_context, -(-positions // CAPACITY_STEP) * CAPACITY_STEP)


@dataclass
class _Bound:
    """An I/O binding and the arrays it reads and writes: they must outlive its runs, and a
    decode step refills the inputs in place."""

    binding: Any
    ids: np.ndarray  # [B, S] int64
    positions: np.ndarray  # [B, S] int64
    seqlens: np.ndarray  # [B] int32
    index: np.ndarray  # [P] int64, logits_index
    logits: np.ndarray  # [B, S or 1, V]
    hidden: np.ndarray | None  # [B, 1, k]: the lm_head's input, for the rescorer
    mask: np.ndarray | None = None  # [B, T] int64, for a graph that takes attention_mask

    def __post_init__(self):
        self.last = self.logits[:, -1]  # [B, V], the view a decode step returns
