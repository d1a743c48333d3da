"""onnxruntime's storage layouts for quantized weights, applied to an emitted model.

llmc ops keep one layout for every target: codes [N, K*bits/8] (4-bit: the even channel in the
low nibble), float scales and integer-valued float zero points [N, K/group]. onnxruntime's
MatMulNBits wants codes as [N, K/block, block*bits/8], flat scales, and uint8 zero points (4-bit:
two per byte, in block order); GatherBlockQuantized wants uint8 zero points. A one-group-per-row
grid becomes blocks of the largest power of two (16..256) that divides K, the row's scale and zero
repeated: the same numbers."""

from __future__ import annotations

import numpy as np

from llmc import quant_layout


def _block(group: int) -> int:
    if group & (group - 1) == 0 and 16 <= group <= 256:
        return group
    for b in (256, 128, 64, 32, 16):
        if group % b == 0:
            return b
    raise ValueError(f"no onnxruntime block size (16..256, a power of two) divides {group}")


def _uint8_zeros(zeros: np.ndarray) -> np.ndarray:
    if not np.array_equal(zeros, np.round(zeros)) or zeros.min() < 0 or zeros.max() > 255:
        raise ValueError("zero points must be integers in 0..255 for onnxruntime's kernels")
    return zeros.astype(np.uint8)


def _unshare(model, inits: dict) -> None:
    """Give every quantized node its own copy of an initializer another node also reads (the
    exporter merges equal tensors: a tied embedding's and lm_head's codes and scales), since the
    two kernels store it differently."""
    quantized = ("MatMulNBits", "GatherBlockQuantized")
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input if node.op_type in quantized else ():
            users[name] = users.get(name, 0) + 1
    for i, node in enumerate(model.graph.node):
        if node.op_type not in quantized:
            continue
        for j, name in enumerate(node.input):
            if name in inits and users[name] > 1:
                copy = model.graph.initializer.add()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__{node.op_type}_{i}"
                inits[copy.name] = copy
                node.input[j] = copy.name
                users[name] -= 1


def _reblock(model, inits: dict) -> None:
    """Give every quantized node a block size onnxruntime takes (`_block`): a group of another
    size (one per row: K = 576 on SmolLM2) has its scales and zero points repeated over the
    blocks it spans, in llmc's [N, K/group] layout. A tensor two nodes share (a tied table's
    scales) is repeated once."""
    from onnx import numpy_helper

    repeated: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        size = next(a for a in node.attribute if a.name == "block_size")
        group = size.i
        block = _block(group)
        if block == group:
            continue
        for name in (n for n in node.input[2:4] if n):  # scales, zero points: both ops
            if name not in repeated:
                array = numpy_helper.to_array(inits[name])
                repeat = np.repeat(array, group // block, axis=1)
                inits[name].CopyFrom(numpy_helper.from_array(repeat, name))
                repeated[name] = group // block
            elif repeated[name] != group // block:
                raise ValueError(f"initializer {name} is shared by nodes of two block sizes")
        size.i = block


def _reshape_tied_table(model, inits: dict) -> None:
    """Store a tied 8-bit table once. The quantization pass gives the embedding and the lm_head
    their own codes; for a tied table without zero points they are equal, and MatMulNBits'
    [N, K/b, b] codes and flat scales hold the same bytes as GatherBlockQuantized's [N, K]
    codes and [N, K/b] scales. The gather then reads the lm_head's tensors through Reshape
    nodes (onnxruntime folds them at load) instead of a copy on disk (32 MB for SmolLM2)."""
    from onnx import helper, numpy_helper

    def plain_8bit(node, op: str) -> dict | None:
        """The attributes of an `op` node with 8-bit codes and no optional inputs, else None."""
        if node.op_type != op or any(node.input[3:]):
            return None
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        return a if a.get("bits") == 8 else None

    def array(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    heads = []  # (codes, scales, block) of each 8-bit lm_head-like matmul onnxruntime keeps as is
    for node in model.graph.node:
        a = plain_8bit(node, "MatMulNBits")
        if a:  # its block is onnxruntime's already (_reblock)
            heads.append((node.input[1], node.input[2], a["block_size"]))
    reshapes = []
    for node in model.graph.node:
        a = plain_8bit(node, "GatherBlockQuantized")
        if a is None:
            continue
        data, scales = array(node.input[0]), array(node.input[2])
        for codes, head_scales, block in heads:
            if block == a["block_size"] and all(
                x is not None and y is not None and np.array_equal(x, y)  # shapes too
                for x, y in ((data, array(codes)), (scales, array(head_scales)))
            ):
                for j, source, like in ((0, codes, data), (2, head_scales, scales)):
                    shape = numpy_helper.from_array(np.array(like.shape, np.int64), source + "__2d")
                    model.graph.initializer.append(shape)
                    reshapes.append(
                        helper.make_node("Reshape", [source, shape.name], [source + "__gather"])
                    )
                    node.input[j] = source + "__gather"
                break
    for i, node in enumerate(reshapes):
        model.graph.node.insert(i, node)
    used = {name for node in model.graph.node for name in node.input}
    used |= {output.name for output in model.graph.output}
    for tensor in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(tensor)  # the gather's own copy
        inits.pop(tensor.name, None)


def apply(model) -> int:
    """Rewrite the quantized weights of `model` (an onnx ModelProto with its initializers
    loaded) in place; return how many nodes were adapted."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    _reblock(model, inits)
    _reshape_tied_table(model, inits)
    _unshare(model, inits)

    def get(name):
        return numpy_helper.to_array(inits[name]) if name else None

    rewritten = set()

    def put(name, array):
        if name in rewritten:
            raise ValueError(f"initializer {name} is shared by two quantized nodes")
        rewritten.add(name)
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))

    done = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            names = list(node.input) + [""] * (6 - len(node.input))
            codes, scales, zeros = get(names[1]), get(names[2]), get(names[3])
            bits, k, block = attrs["bits"], attrs["K"], attrs["block_size"]  # _reblock's
            n = codes.shape[0]
            put(names[1], codes.reshape(n, k // block, quant_layout.packed_width(block, bits)))
            put(names[2], scales.reshape(-1))
            if zeros is not None:
                z = _uint8_zeros(zeros)
                put(names[3], (quant_layout.pack_nibbles(z) if bits == 4 else z).reshape(-1))
            done += 1
        elif node.op_type == "GatherBlockQuantized" and len(node.input) > 3 and node.input[3]:
            put(node.input[3], _uint8_zeros(get(node.input[3])))
            done += 1
    return done
