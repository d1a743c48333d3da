"""Runtime session for ONNX artifacts on onnxruntime (numpy in, numpy out; no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmc.runtime.session import PositionTracker


class Session:
    """Concat-mode KV cache: the runtime keeps past tensors and feeds them back each step."""

    def __init__(self, directory: str | os.PathLike, manifest: dict, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        path = Path(directory) / manifest["target"]["files"]["model"]
        self._sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        model = manifest["model"]
        io = manifest["io"]
        self.max_context = int(io["max_context"])
        self.vocab_size = int(model["vocab_size"])
        self._past_names = io["past_inputs"]
        self._kv_shape = (model["num_kv_heads"], model["head_dim"])
        self._kv_dtype = np.dtype(io["kv_dtype"])
        self._positions = PositionTracker(self.max_context)
        self._past: list[np.ndarray] | None = None

    def reset(self) -> None:
        self._positions.reset()
        self._past = None

    def prefill(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        self.reset()
        return self._step(ids, attention_mask)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return self._step(ids, None)

    def _step(self, ids: np.ndarray, new_mask: np.ndarray | None) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)  # [B, S]
        batch = ids.shape[0]
        if new_mask is None:
            new_mask = np.ones_like(ids)
        mask, positions = self._positions.extend(new_mask)
        if self._past is None:
            empty = np.zeros((batch, *self._kv_shape[:1], 0, self._kv_shape[1]), self._kv_dtype)
            self._past = [empty] * len(self._past_names)
        feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        feeds.update(zip(self._past_names, self._past, strict=False))
        logits, *present = self._sess.run(None, feeds)
        self._past = present  # [B, KVH, T, D] each
        return logits[:, -1, :]  # [B, V]
