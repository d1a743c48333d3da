"""Runtime session for OpenVINO artifacts (numpy in, numpy out; no torch).

The KV cache is the compiled model's state (`stateful` KV mode): one infer request per session,
`reset_state()` at the start of every sequence, `beam_idx` = the rows in order. Precision is
explicit: an fp32 artifact runs with f32 inference and an f32 KV cache unless the caller asks for
bf16, because this CPU plugin otherwise computes "fp32" models in bf16 with a u8/f16 cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmc.runtime.session import PositionTracker

PRECISIONS = {
    # name: compile properties
    "f32": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"},
    "bf16": {"INFERENCE_PRECISION_HINT": "bf16"},
}


def compile_properties(precision: str, threads: int | None) -> dict:
    props = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", **PRECISIONS[precision]}
    if threads:
        props["INFERENCE_NUM_THREADS"] = str(threads)
    return props


class Session:
    fast_kernels = False  # one set of kernels: verification of the default session covers it

    def __init__(
        self,
        directory: str | os.PathLike,
        manifest: dict,
        threads: int | None = None,
        exact: bool = False,
        precision: str | None = None,
    ):
        import openvino as ov

        target = manifest["target"]
        self.precision = "f32" if exact else precision or target.get("precision", "f32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        core = ov.Core()
        model = core.read_model(str(Path(directory) / target["files"]["model"]))
        self.compiled = core.compile_model(
            model, "CPU", compile_properties(self.precision, threads)
        )
        self._request = self.compiled.create_infer_request()
        self.max_context = int(manifest["io"]["max_context"])
        self.vocab_size = int(manifest["model"]["vocab_size"])
        self._inputs = {p.get_any_name() for p in self.compiled.inputs}
        self._positions = PositionTracker(self.max_context)

    def reset(self) -> None:
        self._positions.reset()
        self._request.reset_state()

    def prefill(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        self.reset()
        return self._step(ids, attention_mask)[:, -1]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return self._step(ids, None)[:, -1]

    def score(self, ids: np.ndarray) -> np.ndarray:
        self.reset()
        return self._step(np.asarray(ids)[None], None, all_positions=True)[0]

    def _step(self, ids, new_mask, all_positions: bool = False) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if new_mask is None:
            new_mask = np.ones_like(ids)
        mask, positions = self._positions.extend(np.asarray(new_mask))
        index = np.arange(ids.shape[1]) if all_positions else np.array([ids.shape[1] - 1])
        feeds = {
            "input_ids": ids,
            "position_ids": np.ascontiguousarray(positions),
            "attention_mask": mask,
            "logits_index": index.astype(np.int64),
            "beam_idx": np.arange(ids.shape[0], dtype=np.int32),
        }
        self._request.infer({k: v for k, v in feeds.items() if k in self._inputs})
        return self._request.get_tensor("logits").data.copy()  # [B, S or 1, V]
