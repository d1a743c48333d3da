"""Runtime sessions for ONNX artifacts on onnxruntime (numpy in, numpy out; no torch).

`shared` KV mode (the default pipeline): one buffer per layer, [batch, kv_heads, capacity,
head_dim], owned here and bound through onnxruntime I/O binding as both the past input and the
present output, so GroupQueryAttention writes each step's keys and values in place. A decode
step copies no cache and allocates nothing: its inputs live in preallocated arrays and its
binding is reused. Rows are prefilled one by one (onnxruntime's CPU GroupQueryAttention takes a
multi-token step with a cache for one row only), without padding, so every row's positions are
its cache indices, and in chunks of PREFILL_CHUNK tokens (a causal prompt's later chunks attend
to the earlier ones through the cache, which skips the masked half of the score matrix; a
quantized artifact uses EXACT_PREFILL_CHUNK).

`concat` KV mode (when `rewire_kv_cache` is disabled): the runtime feeds the present tensors back
as the next step's past.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmc.contract import IOContract, KVMode, Logits
from llmc.runtime.session import PositionTracker, SessionOptions, check_context
from llmc.runtime.session import Session as BaseSession
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


def _open(
    directory, manifest: dict, threads: int | None, accuracy_level: int | None = None, rescore=False
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


class Session(BaseSession):
    """An onnxruntime session of an ONNX artifact; `Session(...)` gives the class of the
    artifact's KV mode (SharedKVSession or ConcatKVSession).

    `exact`: quantized matmuls dequantize their weights and multiply in fp32 on every step
    (verification: the numbers of the llmc graph); otherwise decode steps quantize activations
    to int8 (onnxruntime's fast kernels) and only prompts run exactly (faster for many rows, and
    their logits are the exact ones)."""

    def __new__(cls, directory, manifest: dict, options=None):
        if cls is Session:
            shared = IOContract.from_manifest(manifest).kv_mode is KVMode.SHARED
            cls = SharedKVSession if shared else ConcatKVSession
        return super().__new__(cls)

    def __init__(self, directory, manifest: dict, options: SessionOptions | None = None):
        super().__init__(directory, manifest, options)
        threads, exact = self.options.threads, self.options.exact
        quantized = bool(manifest.get("quantization"))
        fast = quantized and not exact
        self.fast_kernels = FAST_KERNELS if fast else None
        self._sess, self._rescore = _open(
            directory, manifest, threads, 0 if exact and quantized else None, rescore=fast
        )
        self._prefill_sess = self._sess
        self._chunk = EXACT_PREFILL_CHUNK if quantized else PREFILL_CHUNK
        if fast:
            self._prefill_sess, _ = _open(directory, manifest, threads, accuracy_level=0)
        io = self.io
        self._past_names, self._present_names = io.past_inputs, io.present_outputs
        self._kv_heads, self._head_dim = io.cache.kv_heads, io.cache.head_dim
        self._kv_dtype = np.dtype(io.cache.dtype)
        self._inputs = {i.name for i in self._sess.get_inputs()}
        self._last_only = io.logits is Logits.LAST  # artifacts from before logits_index


class ConcatKVSession(Session):
    """Concat-mode KV cache: the runtime keeps past tensors and feeds them back each step."""

    def __init__(self, directory, manifest: dict, options: SessionOptions | None = None):
        super().__init__(directory, manifest, options)
        self._positions = PositionTracker(self.max_context)
        self._past: list[np.ndarray] | None = None

    def _reset(self) -> None:
        self._positions.reset()
        self._past = None

    def _prefill(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return self._step(ids, mask)

    def _decode(self, ids: np.ndarray) -> np.ndarray:
        return self._step(ids, None)

    def _step(
        self, ids: np.ndarray, new_mask: np.ndarray | None, all_positions: bool = False
    ) -> np.ndarray:
        feeds = step_feeds(self._positions, ids, new_mask, all_positions)
        ids = feeds["input_ids"]  # [B, S]
        if self._past is None:
            shape = (ids.shape[0], self._kv_heads, 0, self._head_dim)
            self._past = [np.zeros(shape, self._kv_dtype)] * len(self._past_names)
        feeds = {k: v for k, v in feeds.items() if k in self._inputs}
        feeds.update(zip(self._past_names, self._past, strict=True))
        sess = self._prefill_sess if ids.shape[1] > 1 else self._sess
        rescore = self._rescore if sess is self._sess else None
        names = ["logits", *self._present_names] + ([rescore.output] if rescore else [])
        logits, *present = sess.run(names, feeds)
        if rescore:
            rescore(logits[:, -1], present.pop()[:, -1])
        self._past = present  # [B, KVH, T, D] each
        return logits if all_positions else logits[:, -1, :]  # [B, S, V] or [B, V]

    def _score(self, ids: np.ndarray) -> np.ndarray:
        return self._step(ids[None], None, all_positions=True)[0]


class SharedKVSession(Session):
    """Shared-buffer KV cache written in place by the model (see the module docstring)."""

    def __init__(self, directory, manifest: dict, options: SessionOptions | None = None):
        super().__init__(directory, manifest, options)
        self._buffers: list[np.ndarray] = []
        self._lengths: np.ndarray | None = None  # tokens in the cache, per row
        self._decode_binding: _Bound | None = None  # reused by every decode step

    @property
    def capacity(self) -> int:
        return self._buffers[0].shape[2] if self._buffers else 0

    def _reset(self) -> None:
        self._lengths = None

    def _prefill(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        mask = np.ones_like(ids) if mask is None else mask
        rows = [ids[b][mask[b] != 0] for b in range(ids.shape[0])]
        longest = max(len(r) for r in rows)
        check_context(longest, self.max_context)
        self._reserve(len(rows), longest + 1)
        logits = np.empty((len(rows), self.vocab_size), np.float32)
        for b, row in enumerate(rows):
            for start in range(0, len(row), self._chunk):
                chunk = row[None, start : start + self._chunk]
                out = self._run(chunk, start, slice(b, b + 1), all_positions=False)
            logits[b] = out[0, -1]
        self._lengths = np.array([len(r) for r in rows], np.int64)
        return logits

    def _score(self, row: np.ndarray) -> np.ndarray:
        check_context(len(row), self.max_context)
        self._reserve(1, len(row))
        chunks = range(0, len(row), self._chunk)
        out = [self._run(row[None, i : i + self._chunk], i, slice(0, 1), True) for i in chunks]
        self._lengths = np.array([len(row)], np.int64)
        return np.concatenate([o[0] for o in out])

    def _decode(self, ids: np.ndarray) -> np.ndarray:
        needed = int(self._lengths.max()) + 1
        check_context(needed, self.max_context)
        if self._reserve(len(ids), needed) or self._decode_binding is None:
            self._decode_binding = self._bind_decode(len(ids))
        bound = self._decode_binding
        bound.ids[:] = ids
        bound.positions[:, 0] = self._lengths
        bound.seqlens[:] = self._lengths  # the row's length after this step, minus one
        self._sess.run_with_iobinding(bound.binding)
        self._lengths += 1
        out = bound.logits[:, -1].copy()
        if self._rescore:
            self._rescore(out, bound.hidden[:, -1])
        return out

    # -- buffers and bindings --------------------------------------------------------------------
    def _reserve(self, batch: int, needed: int) -> bool:
        """Make the buffers hold `needed` positions for `batch` rows; True if they moved."""
        if self._buffers and self._buffers[0].shape[0] == batch and self.capacity >= needed:
            return False
        grow = max(needed, 2 * self.capacity if self._buffers else 0)
        capacity = min(self.max_context, -(-grow // CAPACITY_STEP) * CAPACITY_STEP)
        shape = (batch, self._kv_heads, capacity, self._head_dim)
        old = self._buffers if self._buffers and self._buffers[0].shape[0] == batch else []
        self._buffers = [np.zeros(shape, self._kv_dtype) for _ in self._past_names]
        for new, previous in zip(self._buffers, old, strict=False):
            new[:, :, : previous.shape[2]] = previous
        self._decode_binding = None
        return True

    def _bind_arrays(self, binding, rows: slice) -> None:
        for past, present, buffer in zip(
            self._past_names, self._present_names, self._buffers, strict=True
        ):
            view = buffer[rows]  # a contiguous block: rows are the outermost dim
            for bind, name in ((binding.bind_input, past), (binding.bind_output, present)):
                bind(name, "cpu", 0, view.dtype, list(view.shape), view.ctypes.data)

    def _bind_input(self, binding, name: str, array: np.ndarray) -> None:
        if name in self._inputs:
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def _run(self, ids: np.ndarray, start: int, rows: slice, all_positions: bool) -> np.ndarray:
        """One step of `ids` [1, S] after `start` cached tokens -> logits [1, S or 1, V]."""
        s = ids.shape[1]
        positions = start + np.arange(s, dtype=np.int64)[None]
        seqlens = np.array([start + s - 1], np.int32)
        index = np.arange(s) if all_positions else np.array([s - 1])
        ids = np.ascontiguousarray(ids)
        sess = self._prefill_sess
        bound = self._binding(ids, positions, seqlens, index, rows, sess)
        sess.run_with_iobinding(bound.binding)
        return bound.logits

    def _bind_decode(self, batch: int):
        """The decode binding: its inputs are arrays the caller fills in place each step."""
        ids, positions = np.zeros((batch, 1), np.int64), np.zeros((batch, 1), np.int64)
        index = np.zeros(1, np.int64)
        seqlens = np.zeros(batch, np.int32)
        return self._binding(ids, positions, seqlens, index, slice(0, batch), self._sess)

    def _binding(self, ids, positions, seqlens, index, rows: slice, sess) -> _Bound:
        """Bind inputs, the rows' KV buffers (as past and present), a logits array and, for the
        rescored decode session, an array for the lm_head's input."""
        if self.io.logits_index:
            kept = len(index)
        else:
            kept = 1 if self._last_only else ids.shape[1]
        logits = np.empty((ids.shape[0], kept, self.vocab_size), np.float32)
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
        if self._rescore and sess is self._sess:
            hidden = np.empty((ids.shape[0], kept, self._rescore.k), np.float32)
            binding.bind_output(
                self._rescore.output, "cpu", 0, hidden.dtype, list(hidden.shape), hidden.ctypes.data
            )
        return _Bound(binding, ids, positions, seqlens, index, logits, hidden)


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
