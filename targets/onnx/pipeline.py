"""The ONNX target's pass pipeline, phase by phase."""

from __future__ import annotations


def pipeline() -> list:
    from llmc.passes.eliminate_dead_code import EliminateDeadCode
    from llmc.passes.remove_assertions import RemoveAssertions
    from llmc.passes.remove_noop_casts import RemoveNoopCasts

    return [
        # Phase 1: clean up what tracing leaves behind.
        RemoveAssertions(),
        RemoveNoopCasts(),
        # Phase 2: fusions and KV rewiring arrive here (see the passes issue).
        # Phase 3: tidy up.
        EliminateDeadCode(),
    ]
