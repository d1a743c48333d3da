"""Quantized weights as TensorRT takes them: block-wise `DequantizeLinear` of signed constants.

TensorRT's weight-only quantization reads a `DequantizeLinear` of an INT8 or INT4 initializer
with a zero point of 0 (its ONNX parser refuses others) feeding a `MatMul`; a block-quantized
weight is dequantized along one axis in blocks. The llmc layout (llmc.quant_layout) stores a
symmetric weight W [N, K] as unsigned codes q = w/scale + 2^(bits-1), scales [N, K/group]. For a
linear layer this module writes the signed codes transposed, [K, N] (so `MatMul(x, W)` needs no
transpose), and scales [K/group, N], blocked along axis 0; for an embedding table it keeps
[V, K], blocked along axis 1, and gathers rows of the dequantized table. INT4 constants are
packed two per byte, the first element in the low nibble (ONNX's INT4 layout).
"""

from __future__ import annotations

import numpy as np

from llmc import quant_layout
from llmc.targets.tensorrt.lowering import PLACEHOLDER_DOMAIN


def _signed(packed: np.ndarray, bits: int) -> np.ndarray:
    codes = quant_layout.unpack(packed, bits).astype(np.int16)
    return (codes - quant_layout.symmetric_zero(bits)).astype(np.int8)


def _constant(name: str, values: np.ndarray, bits: int):
    """An INT8 or INT4 initializer of signed `values`."""
    from onnx import TensorProto, helper, numpy_helper

    if bits == 8:
        return numpy_helper.from_array(np.ascontiguousarray(values, np.int8), name)
    flat = (values.reshape(-1).astype(np.int16) & quant_layout.LOW_NIBBLE).astype(np.uint8)
    raw = quant_layout.pack_nibbles(flat).tobytes()
    return helper.make_tensor(name, TensorProto.INT4, list(values.shape), raw, raw=True)


def rewrite(model) -> int:
    """Replace every placeholder node of `model` (initializers loaded) by standard ONNX; return
    how many were rewritten."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    done = 0
    for i, node in enumerate(model.graph.node):
        if node.domain != PLACEHOLDER_DOMAIN:
            nodes.append(node)
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        bits, group = a["bits"], a["group"]
        codes = _signed(numpy_helper.to_array(inits[node.input[1]]), bits)
        scales = numpy_helper.to_array(inits[node.input[2]])
        base = f"{node.input[1]}.trt{i}"
        weight = f"{base}.weight"
        if node.op_type == "LinearNBits":
            codes, scales, axis = codes.T, scales.T, 0
        else:  # EmbeddingNBits
            axis = 1
        model.graph.initializer.append(_constant(f"{base}.codes", codes, bits))
        model.graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(scales), f"{base}.scales")
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [f"{base}.codes", f"{base}.scales"], [weight],
                axis=axis, block_size=group, name=f"{base}.dequantize",
            )
        )  # fmt: skip
        if node.op_type == "EmbeddingNBits":
            nodes.append(helper.make_node("Gather", [weight, node.input[0]], [node.output[0]]))
        elif len(node.input) > 3 and node.input[3]:
            product = f"{base}.product"
            nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product]))
            nodes.append(helper.make_node("Add", [product, node.input[3]], [node.output[0]]))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], weight], [node.output[0]]))
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    for tensor in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(tensor)  # the llmc-layout codes and scales
    produced = {o for node in model.graph.node for o in node.output}
    for info in [v for v in model.graph.value_info if v.name not in produced]:
        model.graph.value_info.remove(info)  # the exporter's notes on the removed tensors
    for opset in [o for o in model.opset_import if o.domain == PLACEHOLDER_DOMAIN]:
        model.opset_import.remove(opset)
    return done
