"""What every target shares: its emit result and the feeds of a runtime step (numpy, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from llmc.contract import IOContract
    from llmc.runtime.padded import PositionTracker


@dataclass
class EmitResult:
    """What a target's `emit` wrote, for the manifest."""

    files: list[str]
    op_histogram: dict[str, int]
    toolchain: dict[str, str]
    flavor: str = "onnxruntime-cpu"
    io: IOContract | None = None  # the graph's contract as the target changed it (else as traced)
    target: dict | None = None  # extra manifest "target" entries (precision, fused ops)
    notes: list[str] = field(default_factory=list)  # what the build tells the user (one line each)


def step_feeds(
    positions: PositionTracker,
    ids: np.ndarray,
    new_mask: np.ndarray | None,
    all_positions: bool = False,
) -> dict[str, np.ndarray]:
    """The inputs of one step of `ids` [B, S] whose attention mask the runtime keeps: input_ids,
    position_ids and attention_mask [B, T] (`positions` extended by `new_mask`, None: all ones),
    and logits_index (every position, or the last). A session feeds those its model has."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if new_mask is None:
        new_mask = np.ones_like(ids)
    mask, position_ids = positions.extend(np.asarray(new_mask))
    s = ids.shape[1]
    index = np.arange(s) if all_positions else np.array([s - 1])
    return {
        "input_ids": ids,
        "position_ids": np.ascontiguousarray(position_ids),
        "attention_mask": mask,
        "logits_index": index.astype(np.int64),
    }
