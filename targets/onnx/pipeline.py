"""The ONNX target's pass pipeline, phase by phase."""

from __future__ import annotations


def pipeline(quant=None) -> list:
    """The passes, in order; `quant` (a QuantConfig) adds weight quantization."""
    from llmc.contract import KVMode
    from llmc.passes.eliminate_dead_code import EliminateDeadCode
    from llmc.passes.fold_layout import FoldLayout
    from llmc.passes.fuse_projections import FuseQkv
    from llmc.passes.fuse_rms_norm import FuseRmsNorm
    from llmc.passes.fuse_rotary import FuseRotary
    from llmc.passes.fuse_rotary_attention import FuseRotaryAttention
    from llmc.passes.fuse_skip_rms_norm import FuseSkipRmsNorm
    from llmc.passes.pack_qkv import PackQkv
    from llmc.passes.prune_lm_head import PruneLmHead
    from llmc.passes.quantize_weights import QuantizeWeights
    from llmc.passes.remove_assertions import RemoveAssertions
    from llmc.passes.remove_noop_casts import RemoveNoopCasts
    from llmc.passes.replace_attention import ReplaceAttention
    from llmc.passes.rewire_kv_cache import RewireKvCache
    from llmc.passes.split_zero_points import SplitZeroPoints

    return [
        # Phase 0, at trace time: one llmc::attention per layer, shared KV buffers.
        ReplaceAttention(),
        RewireKvCache(KVMode.SHARED),
        # Phase 1: clean up what tracing leaves behind.
        RemoveAssertions(),
        RemoveNoopCasts(),
        # Phase 2: fusions onto llmc ops.
        FuseRmsNorm(),
        FuseSkipRmsNorm(),
        FuseRotary(),
        FuseQkv(),
        # fuse_gate_up is left out here: onnxruntime then needs a Split between the matmul and
        # SiLU·up, which costs more per decode step than the second matmul launch it saves
        # (SmolLM2, same process, alternating: 1.065× vs 1.008× onnxruntime-genai's decode).
        # Phase 3: shape the graph for onnxruntime's kernels, then tidy up.
        FoldLayout(),
        PruneLmHead(),
        FuseRotaryAttention(),
        PackQkv(),
        # Phase 4: weight-only quantization, on the fused projections (a QKV matmul is one layer).
        *([QuantizeWeights(quant), SplitZeroPoints()] if quant else []),
        EliminateDeadCode(),
    ]
