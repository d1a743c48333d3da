"""Exact logits for a decode step's leading candidates.

onnxruntime's fast MatMulNBits kernels (accuracy level 4) quantize each activation row to int8
before multiplying. On the lm_head that noise (about 0.05 in a logit here) is enough to swap two
near-tied candidates, so a quantized artifact's greedy text left its exact numbers within a few
tokens; the exact kernel (level 0) on the lm_head costs 5x a whole decode step, because it
dequantizes all 28 M weights each call. Instead the `TOP` largest logits are recomputed from the
dequantized rows of those candidates only (16 x hidden multiply-adds): greedy and top-k sampling
then see the exact values where they decide. Where it can (a symmetric 8- or 4-bit lm_head writing
the graph's logits: the 8 bits of every --quant build, the 4 a precision plan may choose), the
session does this itself with nodes appended at load (`correct_in_graph`), for every row and
position in one call; elsewhere it also returns the lm_head's input and `LmHeadRescorer` does it
in numpy, row by row, from the model's initializers in onnxruntime's MatMulNBits layout. On
SmolLM2 int8 the in-graph form makes an 8-row decode step 7-8% faster than numpy's per-row loop;
on one row, the numpy rescorer took 4% of the 3% plan's decode time (4-bit lm_head, sampled with
py-spy), and the in-graph form decodes 1.10x faster (median of 12 interleaved pairs).

The fast session's lm_head keeps the artifact's bits. A 4-bit copy of an 8-bit one made at load
would take a twentieth off a SmolLM2 decode step and keep greedy text (the exact best logit ranked
at most 7th among its logits over 800 steps), but the logits outside the rescored ones then err by
0.8 in standard deviation, and the sampling distribution moved by 4.9% in total variation (median
over steps; 0.4% at 8 bits), so it is not done (a plan gives the lm_head 4 bits only where its
perplexity budget allows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmc import quant_layout
from llmc.artifact_checks import artifact_file
from llmc.errors import ArtifactError

TOP = 16  # candidates rescored per row: the exact best logit ranked at most 3rd among the fast
# ones over 400 SmolLM2 decode steps


def largest(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest values of `row`, in no order: the set argpartition gives, in
    about a fifth of its time over a 49152-entry vocabulary (35 vs 185 us), by partitioning only
    the values near the maximum, where a row of logits keeps few."""
    top = row.max()
    window = 4.0
    while np.isfinite(top) and window < 1e4:
        near = np.flatnonzero(row >= top - window)
        if len(near) >= k:
            return near if len(near) == k else near[np.argpartition(row[near], -k)[-k:]]
        window *= 4
    return np.argpartition(row, -k)[-k:]


class LmHeadRescorer:
    """The lm_head's quantized rows, dequantized on demand."""

    def __init__(self, output: str, codes, scales, zeros, bits: int, block: int, k: int, bias=None):
        self.output = output  # the graph output that carries the lm_head's input [B, S, K]
        self.bits, self.block, self.k = bits, block, k
        n = codes.shape[0]
        self.codes = codes.reshape(n, -1)  # [N, blocks * block * bits / 8]
        self.scales = scales.reshape(n, -1).astype(np.float32)  # [N, blocks]
        self.zeros = zeros  # [N, blocks] (unpacked) or None: the midpoint 2^(bits-1)
        self.bias = bias
        self.in_graph = False  # whether the session corrects its logits itself (correct_in_graph)

    @classmethod
    def attach(
        cls, model, directory: Path, vocab_size: int, in_graph: bool = False
    ) -> LmHeadRescorer | None:
        """A rescorer for the weights of `model`'s lm_head (the MatMulNBits with N == vocab), or
        None if it has no such node. With `in_graph`, where `correct_in_graph` can, the model
        corrects its own top logits; otherwise the lm_head's input becomes an extra graph output
        for the runtime to rescore from."""
        from onnx import TensorProto, helper, numpy_helper
        from onnx.external_data_helper import uses_external_data

        attrs = None
        for node in model.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            if a["N"] == vocab_size:
                attrs, head = a, node
        if attrs is None or len(head.input) > 4 and head.input[4]:
            return None  # no quantized lm_head, or a g_idx permutation this does not read
        inits = {t.name: t for t in model.graph.initializer}

        def array(i: int):
            if len(head.input) <= i or not head.input[i]:
                return None
            tensor = inits[head.input[i]]
            if uses_external_data(tensor):
                return _external_array(tensor, Path(directory))
            return numpy_helper.to_array(tensor)

        bits, block, k = attrs["bits"], attrs["block_size"], attrs["K"]
        codes, scales, zeros = array(1), array(2), array(3)
        blocks = -(-k // block)
        if zeros is not None:
            if zeros.dtype != np.uint8:
                return None  # float zero points: onnxruntime's slow path, no fast kernel to fix
            zeros = zeros.reshape(vocab_size, -1)
            if bits == 4:  # two per byte, in block order: the codes' nibble order
                zeros = quant_layout.unpack_nibbles(zeros)
            zeros = zeros[:, :blocks].astype(np.float32)
        output = head.input[0]
        rescorer = cls(output, codes, scales, zeros, bits, block, k, array(5))
        if in_graph and correct_in_graph(model, head, rescorer):
            rescorer.in_graph = True
            return rescorer
        model.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, None))
        return rescorer

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized weight rows `ids` -> [len(ids), K] float32 (the row-major MatMulNBits
        codes are the llmc layout's bytes)."""
        zeros = None if self.zeros is None else self.zeros[ids]
        w = quant_layout.dequantize(self.codes[ids], self.scales[ids], zeros, self.bits, self.block)
        return w[:, : self.k]

    def __call__(self, logits: np.ndarray, hidden: np.ndarray) -> None:
        """Replace, in place, each row's TOP largest `logits` [B, V] by exact ones computed from
        `hidden` [B, K]."""
        for row, h in zip(logits, hidden, strict=True):
            top = largest(row, TOP)
            exact = self.rows(top) @ h.astype(np.float32)
            if self.bias is not None:
                exact += self.bias[top]
            row[top] = exact


def correct_in_graph(model, head, rescorer: LmHeadRescorer) -> bool:
    """Append to `model` what `LmHeadRescorer.__call__` does, as onnxruntime ops after its
    lm_head `head`: the TOP largest fast logits (`_top_indices`), the candidates' rows gathered
    and dequantized from the lm_head's own codes (GatherBlockQuantized, the embedding's op),
    multiplied by the lm_head's input, and scattered back, at every row and position the graph
    computes, in the same call (the numpy rescorer loops over rows: an 8-row SmolLM2 int8
    decode step is 7-8% faster this way). It applies where the lm_head writes the graph's
    `logits` itself, with symmetric 4- or 8-bit codes (no zero points) in whole blocks and no
    bias; False (nothing changed) elsewhere."""
    from onnx import helper, numpy_helper

    r = rescorer
    if (
        head.output[0] != "logits"
        or r.bits not in (4, 8)
        or r.zeros is not None
        or r.bias is not None
        or r.k % r.block  # codes in whole blocks: [N, K * bits / 8] as they are
    ):
        return False
    n, name = r.codes.shape[0], head.name or "lm_head"
    fast, top, rows = "logits__fast", name + "__top", name + "__rows"
    width = r.k * r.bits // 8  # bytes per row: 4-bit codes two a byte, low nibble first in both
    shape = numpy_helper.from_array(np.array([n, width], np.int64), name + "__codes_2d")
    scales = numpy_helper.from_array(np.array([n, r.k // r.block], np.int64), name + "__scales_2d")
    k = numpy_helper.from_array(np.array([TOP], np.int64), name + "__k")
    last = numpy_helper.from_array(np.array([-1], np.int64), name + "__last")
    model.graph.initializer.extend([shape, scales, k, last])
    head.output[0] = fast
    ms = "com.microsoft"
    model.graph.node.extend(
        _top_indices(model, fast, top, n, k.name, last.name)
        + [
            helper.make_node("Reshape", [head.input[1], shape.name], [name + "__codes"]),
            helper.make_node("Reshape", [head.input[2], scales.name], [name + "__scales"]),
            helper.make_node(
                "GatherBlockQuantized",
                [name + "__codes", top, name + "__scales"],
                [rows],  # [B, P, TOP, K]
                domain=ms,
                bits=r.bits,  # no zero points: the midpoint, as MatMulNBits
                block_size=r.block,
                quantize_axis=1,
                gather_axis=0,
            ),
            helper.make_node("Unsqueeze", [head.input[0], last.name], [name + "__h"]),
            helper.make_node("MatMul", [rows, name + "__h"], [name + "__exact4"]),
            helper.make_node("Squeeze", [name + "__exact4", last.name], [name + "__exact"]),
            helper.make_node("ScatterElements", [fast, top, name + "__exact"], ["logits"], axis=-1),
        ]
    )
    return True


CHUNK = 64  # values per chunk of the vocabulary in the graph's two-stage TopK


def _top_indices(model, values: str, out: str, n: int, k: str, last: str) -> list:
    """Nodes writing to `out` the indices of the TOP largest of `values` [B, P, n] on the last
    axis, in no order. Where the vocabulary splits into at least TOP chunks of CHUNK: the TOP
    chunks with the largest maxima, then the TOP largest of their TOP * CHUNK values. Each of
    the TOP largest values lies in one of those chunks (a chunk outside them has TOP maxima
    above its own), so the set is TopK's, up to ties; onnxruntime's TopK over SmolLM2's 49,152
    logits took 42 us at one position and 579 at 16, this 20 and 239."""
    from onnx import helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if n % CHUNK or n // CHUNK < TOP or opset < 18:  # ReduceMax's axes an input from 18
        return [helper.make_node("TopK", [values, k], [out + "_values", out], axis=-1)]

    def const(suffix: str, value: list[int]) -> str:
        model.graph.initializer.append(
            numpy_helper.from_array(np.array(value, np.int64), out + suffix)
        )
        return out + suffix

    chunks = const("_chunks", [0, 0, n // CHUNK, CHUNK])
    flat = const("_flat", [0, 0, TOP * CHUNK])
    spread = const("_spread", [1, 1, 1, CHUNK])
    width = const("_width", [CHUNK])
    x = out + "_"
    return [
        helper.make_node("Reshape", [values, chunks], [x + "by_chunk"]),  # [B, P, n/C, C]
        helper.make_node("ReduceMax", [x + "by_chunk", last], [x + "maxima"], keepdims=0),
        helper.make_node("TopK", [x + "maxima", k], [x + "best_max", x + "best"], axis=-1),
        helper.make_node("Unsqueeze", [x + "best", last], [x + "best4"]),
        helper.make_node("Expand", [x + "best4", spread], [x + "best_wide"]),
        helper.make_node("GatherElements", [x + "by_chunk", x + "best_wide"], [x + "wide"], axis=2),
        helper.make_node("Reshape", [x + "wide", flat], [x + "cand"]),  # [B, P, TOP * C]
        helper.make_node("TopK", [x + "cand", k], [out + "_values", x + "at"], axis=-1),
        helper.make_node("Div", [x + "at", width], [x + "slot"]),
        helper.make_node("GatherElements", [x + "best", x + "slot"], [x + "chunk"], axis=-1),
        helper.make_node("Mod", [x + "at", width], [x + "offset"]),
        helper.make_node("Mul", [x + "chunk", width], [x + "start"]),
        helper.make_node("Add", [x + "start", x + "offset"], [out]),
    ]


def rescore_positions(rescore: LmHeadRescorer, logits: np.ndarray, hidden: np.ndarray) -> None:
    """Exact top logits at every position of every row: logits [B, P, V], hidden [B, >=P, K]."""
    hidden = hidden[:, hidden.shape[1] - logits.shape[1] :]
    for row_logits, row_hidden in zip(logits, hidden, strict=True):
        rescore(row_logits, row_hidden)


def _external_array(tensor, directory: Path) -> np.ndarray:
    """An initializer's bytes read straight from its external data file. onnx's own loader
    refuses a file with more than one hard link, and an artifact built with the stage cache
    shares its files with the cache by hard links (llmc/cache.py)."""
    from onnx import helper

    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    path = artifact_file(directory, info["location"], "its external data")
    count = int(np.prod(tensor.dims, dtype=np.int64))
    data = np.fromfile(path, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    if data.size != count:
        raise ArtifactError(f"{path} is shorter than its model says; rebuild the artifact.")
    return data.reshape(tuple(tensor.dims))
