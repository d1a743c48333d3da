"""The TVM target's pass pipeline.

TVM runs what llmc's own kernels (kernels.py) implement: attention over a shared KV buffer
written in place, RoPE and RMSNorm as llmc ops, and every linear layer as one packed-weight
matmul, so the projections that share an input are fused into one (QKV, gate-up): one kernel
call per decode step instead of two or three."""

from __future__ import annotations


def pipeline(quant=None) -> list:
    """The passes, in order; `quant` (a QuantConfig) adds weight quantization."""
    from llmc.contract import KVMode
    from llmc.passes.eliminate_dead_code import EliminateDeadCode
    from llmc.passes.fold_layout import FoldLayout
    from llmc.passes.fuse_projections import FuseGateUp, FuseQkv
    from llmc.passes.fuse_rms_norm import FuseRmsNorm
    from llmc.passes.fuse_rotary import FuseRotary
    from llmc.passes.fuse_skip_rms_norm import FuseSkipRmsNorm
    from llmc.passes.prune_lm_head import PruneLmHead
    from llmc.passes.quantize_weights import QuantizeWeights
    from llmc.passes.remove_assertions import RemoveAssertions
    from llmc.passes.remove_noop_casts import RemoveNoopCasts
    from llmc.passes.replace_attention import ReplaceAttention
    from llmc.passes.rewire_kv_cache import RewireKvCache

    return [
        # Phase 0, at trace time: one llmc::attention per layer on shared KV buffers.
        ReplaceAttention(),
        RewireKvCache(KVMode.SHARED),
        # Phase 1: clean up what tracing leaves behind.
        RemoveAssertions(),
        RemoveNoopCasts(),
        # Phase 2: fusions onto llmc ops and wider matmuls.
        FuseRmsNorm(),
        FuseSkipRmsNorm(),
        FuseRotary(),
        FuseQkv(),
        FuseGateUp(),
        # Phase 3: the layout round trips the fusions leave, and logits only where read.
        FoldLayout(),
        PruneLmHead(),
        # Phase 4: weight-only quantization, on the fused projections.
        *([QuantizeWeights(quant)] if quant else []),
        EliminateDeadCode(),
    ]
