"""The OpenVINO target's pass pipeline.

OpenVINO's CPU plugin fuses RMSNorm, RoPE and stateful attention itself when it sees the ATen
forms it knows: the passes put the graph in those forms and leave the rest alone. Attention
becomes one llmc::attention per layer (concat KV mode), lowered to concat + SDPA (lowering.py);
RMSNorm is fused to llmc::rms_norm, whose reference form is the pattern the plugin fuses; RoPE
stays as transformers traced it (the plugin's RoPE patterns are those)."""

from __future__ import annotations


def pipeline(quant=None) -> list:
    """The passes, in order; `quant` (a QuantConfig) adds weight quantization."""
    from llmc.passes.eliminate_dead_code import EliminateDeadCode
    from llmc.passes.fuse_rms_norm import FuseRmsNorm
    from llmc.passes.prune_lm_head import PruneLmHead
    from llmc.passes.quantize_weights import QuantizeWeights
    from llmc.passes.remove_assertions import RemoveAssertions
    from llmc.passes.remove_noop_casts import RemoveNoopCasts
    from llmc.passes.replace_attention import ReplaceAttention

    return [
        # Phase 0, at trace time: one llmc::attention per layer; the KV cache stays in concat
        # mode in the graph and becomes OpenVINO state at emission.
        ReplaceAttention(),
        # Phase 1: clean up what tracing leaves behind.
        RemoveAssertions(),
        RemoveNoopCasts(),
        # Phase 2: fusions the plugin then recognises.
        FuseRmsNorm(),
        PruneLmHead(),
        # Phase 3: weight-only quantization (lowered to compressed constants).
        *([QuantizeWeights(quant)] if quant else []),
        EliminateDeadCode(),
    ]
