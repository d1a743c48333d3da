"""onnxruntime-genai's I/O conventions for an emitted ONNX graph (llmc build --compat
onnxruntime-genai).

onnxruntime-genai feeds `input_ids`, `attention_mask` [B, total length], `position_ids` (when the
graph has it) and the past KV buffers, and reads `logits` and the present buffers; it cannot feed
llmc's `seqlens_k` or `logits_index`. So the graph computes them itself:
    seqlens_k    = int32(ReduceSum(attention_mask, axis 1) - 1)   (what its own builder does)
    logits_index = [S - 1]                                         (the last position: all it reads)
The lm_head stays pruned to that one position. An input nothing reads (`position_ids`, where
GroupQueryAttention rotates inside) is dropped, as onnxruntime-genai's own models do."""

from __future__ import annotations

from llmc.contract import IOContract, KVMode

_PREFIX = "llmc_compat_"


def onnxruntime_genai_form(model, io: IOContract) -> IOContract:
    """Rewrite `model` (an onnx ModelProto, graph only) in place; return its contract."""
    from onnx import TensorProto, helper

    graph = model.graph
    names = {i.name for i in graph.input}
    nodes, constants = [], []

    def constant(name: str, values: list[int], dims: list[int]) -> str:
        constants.append(helper.make_tensor(_PREFIX + name, TensorProto.INT64, dims, values))
        return _PREFIX + name

    if "logits_index" in names:
        one = constant("one", [1], [1])
        nodes.append(helper.make_node("Shape", ["input_ids"], [_PREFIX + "length"], start=1, end=2))
        nodes.append(helper.make_node("Sub", [_PREFIX + "length", one], ["logits_index"]))
    if "seqlens_k" in names:
        axis, one = constant("axis", [1], [1]), constant("one_", [1], [])
        nodes += [
            helper.make_node("ReduceSum", ["attention_mask", axis], [_PREFIX + "held"], keepdims=0),
            helper.make_node("Sub", [_PREFIX + "held", one], [_PREFIX + "seqlens"]),
            helper.make_node("Cast", [_PREFIX + "seqlens"], ["seqlens_k"], to=TensorProto.INT32),
        ]
    read = {name for node in graph.node for name in node.input}
    dropped = {"logits_index", "seqlens_k"} | {n for n in ("position_ids",) if n not in read}
    kept = [i for i in graph.input if i.name not in dropped]
    if "seqlens_k" in names:
        mask = helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        )
        kept.insert(1, mask)
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(constants)
    body = [*nodes, *graph.node]
    del graph.node[:]
    graph.node.extend(body)
    io = io.without_inputs(dropped & {"position_ids"}).last_position_only()
    return io.with_mask_input() if io.kv_mode is KVMode.SHARED else io
