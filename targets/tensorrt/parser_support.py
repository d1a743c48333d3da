"""What TensorRT's ONNX parser takes, as a table, and a check of a network against it.

Written from the ONNX-TensorRT parser's operator table (docs/operators.md, TensorRT 10.x: opsets
9..23, the types and restrictions of each op) and its changelog: `Attention` since TensorRT 10.14,
`RotaryEmbedding` and `RMSNormalization` since 10.15. The networks llmc writes need TensorRT 10.15
or newer. Only the ops llmc's exporter emits are listed: an op missing from the table is reported
as unsupported, so a new lowering has to be checked against the parser's documentation and
added here before it can ship. TensorRT 11 networks are strongly typed; the types listed are
the ones a strongly typed network may carry through the op.
"""

from __future__ import annotations

from dataclasses import dataclass

TENSORRT_VERSION = "10.15"  # the oldest TensorRT whose ONNX parser takes every op below
MAX_OPSET = 23

F = frozenset({"FLOAT", "FLOAT16", "BFLOAT16"})
I = frozenset({"INT32", "INT64"})  # noqa: E741
B = frozenset({"BOOL"})
# Tensor types the parser takes at all; UINT8 only as a network input or output.
TYPES = F | I | B | {"INT8", "INT4", "FLOAT8E4M3FN", "UINT8", "DOUBLE"}


@dataclass(frozen=True)
class Op:
    types: frozenset  # the types of the op's data input (its first)
    constant_inputs: tuple[int, ...] = ()  # inputs that must be initializers or Constant outputs
    since: str = "10.0"


SUPPORTED: dict[str, Op] = {
    "Abs": Op(F | I),
    "Add": Op(F | I),
    "And": Op(B),
    "Attention": Op(F, since="10.14"),
    "Cast": Op(F | I | B | {"UINT8"}),
    "CastLike": Op(F | I | B),
    "Concat": Op(F | I | B),
    "Constant": Op(F | I | B),
    "ConstantOfShape": Op(I),
    "Cos": Op(F),
    "DequantizeLinear": Op(frozenset({"INT8", "INT4", "FLOAT8E4M3FN"}), (0, 1)),
    "Div": Op(F | I),
    "Equal": Op(F | I),
    "Erf": Op(F),
    "Exp": Op(F),
    "Expand": Op(F | I | B),
    "Gather": Op(F | I | B),
    "GatherElements": Op(F | I | B),
    "GatherND": Op(F | I | B),
    "Gelu": Op(F),
    "Gemm": Op(F),
    "Greater": Op(F | I),
    "GreaterOrEqual": Op(F | I),
    "Identity": Op(F | I | B),
    "LayerNormalization": Op(F),
    "Less": Op(F | I),
    "LessOrEqual": Op(F | I),
    "MatMul": Op(F),
    "Max": Op(F | I),
    "Min": Op(F | I),
    "Mod": Op(F | I),
    "Mul": Op(F | I),
    "Neg": Op(F | I),
    "Not": Op(B),
    "Or": Op(B),
    "Pow": Op(F),
    "Range": Op(F | I),
    "Reciprocal": Op(F),
    "ReduceMax": Op(F | I, (1,)),
    "ReduceMean": Op(F | I, (1,)),
    "ReduceMin": Op(F | I, (1,)),
    "ReduceSum": Op(F | I, (1,)),
    "Relu": Op(F | I),
    "Reshape": Op(F | I | B),
    "RMSNormalization": Op(F, since="10.15"),
    "RotaryEmbedding": Op(F, since="10.15"),
    "Shape": Op(F | I | B),
    "Sigmoid": Op(F),
    "Sin": Op(F),
    "Slice": Op(F | I | B, (3,)),
    "Softmax": Op(F),
    "Softplus": Op(F),  # Mamba's Δ (an activation layer of TensorRT's)
    "Split": Op(F | I | B),
    "Sqrt": Op(F),
    "Squeeze": Op(F | I | B, (1,)),
    "Sub": Op(F | I),
    "Tanh": Op(F),
    "Tile": Op(F | I | B),
    "Trilu": Op(F | I | B),
    "Transpose": Op(F | I | B),
    "Unsqueeze": Op(F | I | B, (1,)),
    "Where": Op(F | I | B),
}


def _type_name(elem_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type)


def _types(model) -> dict[str, str]:
    """The element type of every tensor of `model` that shape inference can name."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    names = {}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        if v.type.HasField("tensor_type"):
            names[v.name] = _type_name(v.type.tensor_type.elem_type)
    for t in graph.initializer:
        names[t.name] = _type_name(t.data_type)
    return names


def check(model) -> list[str]:
    """What in `model` (an ONNX ModelProto; its weights need not be loaded) TensorRT's parser
    does not take, one line each; empty when all of it is supported."""
    from onnx import helper

    problems = []
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opsets.get("ai.onnx", 0) > MAX_OPSET:
        problems.append(f"opset {opsets['ai.onnx']} is newer than TensorRT's {MAX_OPSET}")
    types = _types(model)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    io = {v.name for v in [*model.graph.input, *model.graph.output]}
    for name, kind in sorted(types.items()):
        if kind not in TYPES or (kind == "UINT8" and name not in io):
            problems.append(f"tensor {name} is {kind}")
    for node in model.graph.node:
        where = f"{node.op_type} {node.name or node.output[0]}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain {node.domain} (TensorRT parses standard ONNX only)")
            continue
        op = SUPPORTED.get(node.op_type)
        if op is None:
            problems.append(f"{where}: not in the table of ops TensorRT parses")
            continue
        first = types.get(node.input[0]) if node.input and node.input[0] else None
        if first is not None and first not in op.types:
            problems.append(f"{where}: input type {first} (takes {', '.join(sorted(op.types))})")
        for i in op.constant_inputs:
            if i < len(node.input) and node.input[i] and node.input[i] not in constants:
                problems.append(f"{where}: input {i} must be a constant")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2]:
            problems.append(f"{where}: a zero point (TensorRT takes zero points of 0 only)")
        if node.op_type == "Attention" and (len(node.output) > 3 and node.output[3]):
            problems.append(f"{where}: the qk_matmul_output output")
        if node.op_type == "LayerNormalization" and any(node.output[1:]):
            problems.append(f"{where}: its Mean or InvStdDev output (TensorRT computes Y only)")
        if node.op_type == "Cast" and _type_name(attrs["to"]) not in TYPES - {"DOUBLE"}:
            problems.append(f"{where}: cast to {_type_name(attrs['to'])}")
    return problems


def ops_since(model) -> str:
    """The oldest TensorRT version whose parser has every op of `model`."""
    versions = [SUPPORTED[n.op_type].since for n in model.graph.node if n.op_type in SUPPORTED]
    return max(versions, key=lambda v: tuple(int(x) for x in v.split(".")), default="10.0")
