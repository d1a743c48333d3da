"""Runtime model and sequences for ONNX artifacts on onnxruntime (numpy in, numpy out; no torch).

`shared` KV mode (the default pipeline): one buffer per layer, [batch, kv_heads, capacity,
head_dim], owned here and bound through onnxruntime I/O binding as both the past input and the
present output, so GroupQueryAttention writes each step's keys and values in place. A decode
step copies no cache and allocates nothing: its inputs live in preallocated arrays and its
binding is reused. Every row's positions are its cache indices (no left padding). Prompts that
fit one chunk are prefilled together, right-padded (onnxruntime's CPU GroupQueryAttention takes
a batched first prompt, each row ending at its seqlens_k); longer ones row by row (it takes a
multi-token step with a cache for one row only), in chunks of PREFILL_CHUNK tokens (a causal
prompt's later chunks attend to the earlier ones through the cache, which skips the masked half
of the score matrix; a quantized artifact uses EXACT_PREFILL_CHUNK). Rows of a running batch
are slots of the buffers: rows joining it take the next slots (continuous batching).

`concat` KV mode (when `rewire_kv_cache` is disabled): the runtime feeds the present tensors back
as the next step's past.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmc.contract import KVMode, Logits
from llmc.errors import SessionError
from llmc.runtime.session import Model as BaseModel
from llmc.runtime.session import (
    PaddedRows,
    PositionTracker,
    Sequence,
    SessionOptions,
    check_context,
)
from llmc.targets.base import step_feeds
from llmc.targets.onnx.rescore import LmHeadRescorer

CAPACITY_STEP = 256  # buffer positions are reserved in multiples of this
PREFILL_CHUNK = 256  # long prompts run in chunks: less attention work, bounded scratch memory
# A quantized artifact's prompts run on exact kernels that dequantize every weight on each call
# (about 0.35 s for int8 SmolLM2), which outweighs the attention that smaller chunks skip: a
# 1024-token int8 prompt takes 5.4 s in chunks of 256, 4.7 s in 512, 4.4 s in 1024 (fp32: 4.0 s
# whatever the chunk).
EXACT_PREFILL_CHUNK = 1024
# What a quantized artifact's default session computes differently from the exact one.
FAST_KERNELS = "MatMulNBits accuracy level 4: int8 activations on decode steps, prompts exact"
# Extend steps of at most this many tokens on a live cache (verifying drafted tokens) run on the
# decode kernels, with every position's top logits rescored; longer ones run as a prefill.
SHORT_EXTEND = 16
# A request joining a running batch (continuous batching) prefills on the fast kernels up to this
# many prompt tokens: every running request waits for its prefill, and the exact kernels' fixed
# cost of dequantizing every weight would stall them all (int8 SmolLM2, 40-token prompt: 147 ms
# exact, 30 ms fast; 512 tokens: 421 and 290 ms). Its last logits are rescored as a decode's.
FAST_JOIN = 512


def _open(
    directory,
    manifest: dict,
    threads: int | None,
    accuracy_level: int | None = None,
    rescore=False,
    spin: bool = True,
):
    """An onnxruntime session and its lm_head rescorer (or None). `accuracy_level` overrides
    every MatMulNBits' (0: dequantize the weights and multiply in fp32, exactly what the llmc op
    computes); `rescore`: expose the lm_head's input for exact top logits (rescore.py)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # Pinned where onnxruntime has a choice that changes numbers: denormals are kept (its default).
    # The rest is fixed by the graph: fp32 GEMMs pick an AVX2 or AVX-512 kernel by CPU (the same
    # arithmetic, other summation order) and the fast MatMulNBits kernels a VNNI or AMX path;
    # the build records their distance from the exact ones with the CPU it ran on.
    opts.add_session_config_entry("session.set_denormal_as_zero", "0")
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    path = Path(directory) / manifest["target"]["files"]["model"]
    providers = ["CPUExecutionProvider"]
    if accuracy_level is None and not rescore:
        return ort.InferenceSession(str(path), opts, providers=providers), None
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = a.i if accuracy_level is None else accuracy_level
    vocab = int(manifest["model"]["vocab_size"])
    rescorer = LmHeadRescorer.attach(model, path.parent, vocab) if rescore else None
    folder = "session.model_external_initializers_file_folder_path"
    opts.add_session_config_entry(folder, str(path.parent))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers), rescorer


class Model(BaseModel):
    """An ONNX artifact loaded on onnxruntime: its sessions, shared by every sequence (an
    onnxruntime session runs concurrent calls); `sequence()` gives one of the artifact's KV mode.

    `exact`: quantized matmuls dequantize their weights and multiply in fp32 on every step
    (verification: the numbers of the llmc graph); otherwise decode steps quantize activations
    to int8 (onnxruntime's fast kernels) and only prompts run exactly (faster for many rows, and
    their logits are the exact ones)."""

    spins = True

    def __init__(self, directory, manifest: dict, options: SessionOptions | None = None):
        super().__init__(directory, manifest, options)
        threads, exact = self.options.threads, self.options.exact
        quantized = bool(manifest.get("quantization"))
        fast = quantized and not exact
        self.fast_kernels = FAST_KERNELS if fast else None
        spin = self.options.spin
        self.decode_session, self.rescore = _open(
            directory, manifest, threads, 0 if exact and quantized else None, fast, spin
        )
        self.prefill_session = self.decode_session
        self.chunk = EXACT_PREFILL_CHUNK if quantized else PREFILL_CHUNK
        # Exact quantized steps dequantize every weight into scratch on each call (113 MB for
        # SmolLM2's lm_head alone): one at a time, so that concurrent sequences do not each hold
        # that scratch (four int8 SmolLM2 prompts at once: peak RSS 1.56x one's, 1.0x in turn).
        self.exact_steps = threading.Lock() if quantized else contextlib.nullcontext()
        if fast:
            self.prefill_session, _ = _open(directory, manifest, threads, 0, spin=spin)
        self.inputs = {i.name for i in self.decode_session.get_inputs()}
        self.last_only = self.io.logits is Logits.LAST  # artifacts from before logits_index

    def sequence(self) -> Sequence:
        if self.io.kv_mode is KVMode.SHARED:
            return SharedKVSequence(self)
        return ConcatKVSequence(self)

    def session_for(self, tokens: int, live: bool, join: bool = False):
        """The session of a step of `tokens` new tokens (on a live cache or a fresh one) and
        its lm_head rescorer: short steps on a live cache run on the decode kernels, and so do
        the prompts of rows joining a running batch (`join`) on the fast kernels."""
        if live and tokens <= SHORT_EXTEND:
            return self.decode_session, self.rescore
        if join and self.rescore is not None and tokens <= FAST_JOIN:
            return self.decode_session, self.rescore
        return self.prefill_session, None

    def run(self, sess, *args):
        """`sess.run(*args)`, or run_with_iobinding for a binding; exact quantized ones in turn."""
        run = sess.run_with_iobinding if len(args) == 1 else sess.run
        if sess is self.prefill_session:
            with self.exact_steps:
                return run(*args)
        return run(*args)

    def check_positions(self, last_only: bool) -> None:
        if self.last_only and not last_only:
            raise SessionError(
                f"{self.directory} returns logits for the last position only (an older "
                "build); rebuild it to score or extend by several tokens."
            )


def _rescore(rescore, logits: np.ndarray, hidden: np.ndarray) -> None:
    """Exact top logits at every position of every row: logits [B, P, V], hidden [B, >=P, K]."""
    hidden = hidden[:, hidden.shape[1] - logits.shape[1] :]
    for row_logits, row_hidden in zip(logits, hidden, strict=True):
        rescore(row_logits, row_hidden)


class ConcatKVSequence(PaddedRows, Sequence):
    """Concat-mode KV cache: the runtime keeps past tensors and feeds them back each step."""

    def __init__(self, model: Model):
        super().__init__(model)
        io = model.io
        self._positions = PositionTracker(model.max_context)
        self._past: list[np.ndarray] | None = None
        self._empty = (io.cache.kv_heads, io.cache.head_dim, np.dtype(io.cache.dtype))

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

    def _extend(self, ids: np.ndarray, mask: np.ndarray | None, last_only: bool) -> np.ndarray:
        m = self.model
        m.check_positions(last_only)
        live = self._past is not None
        feeds = step_feeds(self._positions, ids, mask, all_positions=not last_only)
        if not live:
            heads, dim, dtype = self._empty
            empty = np.zeros((ids.shape[0], heads, 0, dim), dtype)
            self._past = [empty] * len(m.io.past_inputs)
        feeds = {k: v for k, v in feeds.items() if k in m.inputs}
        feeds.update(zip(m.io.past_inputs, self._past, strict=True))
        sess, rescore = m.session_for(ids.shape[1], live)
        names = ["logits", *m.io.present_outputs] + ([rescore.output] if rescore else [])
        logits, *present = m.run(sess, names, feeds)
        if last_only:
            logits = logits[:, -1:]
        if rescore:
            _rescore(rescore, logits, present.pop())
        self._past = present  # [B, KVH, T, D] each
        return logits  # [B, 1 or S, V]


class SharedKVSequence(Sequence):
    """Shared-buffer KV cache written in place by the model (see the module docstring)."""

    def __init__(self, model: Model):
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
        m.check_positions(last_only)
        ends = starts + np.array([len(r) for r in rows], np.int64)
        check_context(int(ends.max()), m.max_context)
        self._reserve(first + len(rows), int(ends.max()) + 1)
        sess, rescore = m.session_for(width, live, join)
        chunk = m.chunk if sess is m.prefill_session else width
        longest, tokens = max(len(r) for r in rows), sum(len(r) for r in rows)
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
            pieces = []
            for at in range(0, len(row), chunk):
                piece = row[None, at : at + chunk]
                start, slot = int(starts[b]) + at, first + b
                pieces.append(self._run(piece, start, slot, last_only, sess, rescore))
            out[b] = pieces[-1][0, -1:] if last_only else np.concatenate([p[0] for p in pieces])
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
        self.model.run(sess, bound.binding)
        picked = np.searchsorted(index, last)
        out = bound.logits[np.arange(n), picked][:, None].copy()  # [n, 1, V]
        if rescore:
            rescore(out[:, 0], bound.hidden[np.arange(n), picked])
        return out

    def _decode(self, ids: np.ndarray) -> np.ndarray:
        m = self.model
        check_context(int(self._held.max()) + 1, m.max_context)
        self._reserve(len(ids), int(self._held.max()) + 1)
        bound = self._decoders.get(len(ids))
        if bound is None:
            bound = self._decoders[len(ids)] = self._bind_decode(len(ids))
        bound.ids[:] = ids
        bound.positions[:, 0] = self._held
        bound.seqlens[:] = self._held  # the row's length after this step, minus one
        m.run(m.decode_session, bound.binding)
        self._held += 1
        out = bound.logits[:, -1].copy()
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

    def _run(self, ids, start: int, row: int, last_only: bool, sess, rescore) -> np.ndarray:
        """One step of `ids` [1, S] of row `row` after `start` cached tokens -> logits
        [1, 1 or S, V]."""
        s = ids.shape[1]
        key = (row, s, last_only, sess is self.model.decode_session)
        bound = self._bound.get(key)  # a short step's binding is kept and refilled
        if bound is None:
            positions, seqlens = np.zeros((1, s), np.int64), np.zeros(1, np.int32)
            index = np.array([s - 1], np.int64) if last_only else np.arange(s, dtype=np.int64)
            ids_in = np.zeros((1, s), np.int64)
            rows = slice(row, row + 1)
            bound = self._binding(sess, ids_in, positions, seqlens, index, rows, rescore)
            if s <= SHORT_EXTEND:
                self._bound[key] = bound
        bound.ids[:] = ids
        bound.positions[0] = start + np.arange(s)
        bound.seqlens[0] = start + s - 1
        self.model.run(sess, bound.binding)
        if rescore:
            _rescore(rescore, bound.logits, bound.hidden)
        return (bound.logits[:, -1:] if last_only else bound.logits).copy()

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
