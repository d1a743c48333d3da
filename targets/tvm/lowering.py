"""llmc ops and linear layers in Relax: converters for TVM's `from_exported_program`.

Every linear layer whose weight is a model parameter becomes a call of the packed-weight matmul
(kernels.linear) on `pack(W)`; the packing reads only a parameter, so LiftTransformParams moves
it out of the step function into `main_transform_params`, run once when a session loads. The
embedding reads the same packed table (a tied lm_head is held once). Attention on a shared KV
buffer is `kv_write` in place, then `attention` over the cache; RMSNorm is Relax's `rms_norm`,
RoPE a kernel of its own. What these converters do not take (concat-mode attention, a packed
QKV, RoPE inside attention) is decomposed to ATen before the import (emit.py).
"""

from __future__ import annotations

import torch
from torch import fx
from tvm import relax
from tvm.script import tirx as T

from llmc.targets.tvm import kernels

ATTENTION = torch.ops.llmc.attention.default


def attention_supported(node: fx.Node) -> bool:
    """Whether `attention` lowers this llmc::attention call: a shared cache with separate q, k
    and v and RoPE outside (what the TVM pipeline produces)."""
    args = node.args
    return bool(args[12]) and args[1] is not None and args[2] is not None and args[10] is None


def rotary(width: int, rot: int, interleaved: bool):
    """RoPE on x [B, S, width] (heads of `rot` dims) at positions [B, S] from cos/sin tables
    [C, rot/2], as llmc::rotary defines it."""
    half = rot // 2
    heads = width // rot

    @T.prim_func(private=True)
    def rotary_kernel(
        x_h: T.handle, cos_h: T.handle, sin_h: T.handle, pos_h: T.handle, o_h: T.handle
    ):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        b, s, c = T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_h, (b, s, width), "float32")
        cos = T.match_buffer(cos_h, (c, half), "float32")
        sin = T.match_buffer(sin_h, (c, half), "float32")
        pos = T.match_buffer(pos_h, (b, s), "int64")
        o = T.match_buffer(o_h, (b, s, width), "float32")
        for t in range(b * s):  # light work: serial beats a parallel launch at decode
            for h in range(heads):
                for j in range(half):
                    p = pos[t // s, t % s]
                    if interleaved:
                        o[t // s, t % s, h * rot + 2 * j] = (
                            x[t // s, t % s, h * rot + 2 * j] * cos[p, j]
                            - x[t // s, t % s, h * rot + 2 * j + 1] * sin[p, j]
                        )
                        o[t // s, t % s, h * rot + 2 * j + 1] = (
                            x[t // s, t % s, h * rot + 2 * j + 1] * cos[p, j]
                            + x[t // s, t % s, h * rot + 2 * j] * sin[p, j]
                        )
                    else:
                        o[t // s, t % s, h * rot + j] = (
                            x[t // s, t % s, h * rot + j] * cos[p, j]
                            - x[t // s, t % s, h * rot + j + half] * sin[p, j]
                        )
                        o[t // s, t % s, h * rot + j + half] = (
                            x[t // s, t % s, h * rot + j + half] * cos[p, j]
                            + x[t // s, t % s, h * rot + j] * sin[p, j]
                        )

    return rotary_kernel


class Converters:
    """The custom convert map of one import, with what it shares between calls: the kernels
    added to the module (one per size) and each weight's packed form (one per parameter)."""

    def __init__(self):
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.packed: dict[relax.Var, relax.Var] = {}
        self.counts: dict[str, int] = {}

    def table(self, attention: bool) -> dict:
        table = {
            "linear.default": self.linear,
            "embedding.default": self.embedding,
            "rms_norm.default": self.rms_norm,
            "skip_rms_norm.default": self.skip_rms_norm,
            "rotary.default": self.rotary,
            "linear_nbits.default": self.linear_nbits,
            "embedding_nbits.default": self.embedding_nbits,
            "index_select.default": self.index_select,
            "index.Tensor": self.index,
        }
        if attention:
            table["attention.default"] = self.attention
        return table

    # -- helpers -------------------------------------------------------------------------------
    def _kernel(self, imp, key: tuple, make) -> relax.GlobalVar:
        if key not in self.kernels:
            self.kernels[key] = imp.block_builder.add_func(make(), "_".join(map(str, key)))
        self.counts[key[0]] = self.counts.get(key[0], 0) + 1
        return self.kernels[key]

    def _pack(self, imp, w: relax.Var) -> relax.Var:
        """w [N, K] as [N/16, K, 16] (kernels.pack), once per parameter."""
        if w not in self.packed:
            n, k = (int(x) for x in w.ty.shape)
            dtype = str(w.ty.dtype)
            gv = self._kernel(imp, ("pack", n, k, dtype), lambda: kernels.pack(n, k, dtype))
            out = relax.TensorType([kernels.blocks(n), k, kernels.LANES], dtype)
            self.packed[w] = imp.block_builder.emit(relax.op.call_tir(gv, [w], out))
        return self.packed[w]

    @staticmethod
    def _rows(imp, x: relax.Expr, width: int) -> tuple[relax.Expr, list, object]:
        """x [..., width] as [rows, width]: (that, the leading dims, rows)."""
        lead = list(x.ty.shape)[:-1]
        rows = 1
        for d in lead:
            rows = rows * d
        return imp.block_builder.emit(relax.op.reshape(x, [rows, width])), lead, rows

    @staticmethod
    def _flat_ids(imp, ids: relax.Expr) -> tuple[relax.Expr, list, object]:
        """Token ids of any shape as int64 [rows]: (that, their shape, rows)."""
        bb = imp.block_builder
        lead = list(ids.ty.shape)
        rows = 1
        for d in lead:
            rows = rows * d
        flat = bb.emit(relax.op.reshape(ids, [rows]))
        if ids.ty.dtype != "int64":
            flat = bb.emit(relax.op.astype(flat, "int64"))
        return flat, lead, rows

    @staticmethod
    def _placeholder_zeros(shape) -> relax.Constant:
        """What a symmetric op passes for its zero points (the kernel never reads it)."""
        import numpy as np
        import tvm

        return relax.const(tvm.runtime.tensor(np.zeros(shape, np.float32)))

    @staticmethod
    def _packable(imp, node: fx.Node) -> bool:
        w = imp.env.get(node)
        return (
            node.op == "placeholder"
            and isinstance(w, relax.Var)
            and w.ty.dtype == "float32"
            and len(w.ty.shape) == 2
            and all(isinstance(x, int) or hasattr(x, "value") for x in w.ty.shape)
        )

    # -- converters ----------------------------------------------------------------------------
    def linear(self, node: fx.Node, imp) -> relax.Expr:
        x_node, w_node = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        x = imp.env[x_node]
        if not self._packable(imp, w_node) or x.ty.dtype != "float32":
            return imp._linear(node)
        n, k = (int(d) for d in imp.env[w_node].ty.shape)
        gv = self._kernel(imp, ("linear", n, k), lambda: kernels.linear(n, k))
        return self._matmul(imp, gv, x, k, n, [self._pack(imp, imp.env[w_node])], bias)

    def _matmul(self, imp, gv, x, k: int, n: int, weights: list, bias) -> relax.Expr:
        """x [..., K] through the matmul kernel `gv` with its weight arguments -> [..., N]."""
        bb = imp.block_builder
        x2, lead, rows = self._rows(imp, x, k)
        out = relax.TensorType([rows, n], "float32")
        y = bb.emit(relax.op.call_tir(gv, [x2, *weights], out))
        if bias is not None:
            y = bb.emit(relax.op.add(y, imp.env[bias]))
        return bb.emit(relax.op.reshape(y, [*lead, n]))

    def linear_nbits(self, node: fx.Node, imp) -> relax.Expr:
        """llmc::linear_nbits: dequantization fused into the packed matmul."""
        x, codes, scales = (imp.env[a] for a in node.args[:3])
        zeros = None if node.args[3] is None else imp.env[node.args[3]]
        bits, group = int(node.args[4]), int(node.args[5])
        bias = node.args[6] if len(node.args) > 6 else None
        n, groups = (int(d) for d in scales.ty.shape)
        k = groups * group
        key = ("linear_nbits", n, k, bits, group, int(zeros is not None))
        gv = self._kernel(
            imp, key, lambda: kernels.linear_nbits(n, k, bits, group, zeros is not None)
        )
        z = self._pack(imp, zeros) if zeros is not None else self._placeholder_zeros((1, 1, 16))
        weights = [self._pack(imp, codes), self._pack(imp, scales), z]
        return self._matmul(imp, gv, x, k, n, weights, bias)

    def embedding_nbits(self, node: fx.Node, imp) -> relax.Expr:
        """llmc::embedding_nbits: rows dequantized from the table in llmc's layout."""
        ids, codes, scales = (imp.env[a] for a in node.args[:3])
        zeros = None if node.args[3] is None else imp.env[node.args[3]]
        bits, group = int(node.args[4]), int(node.args[5])
        if bits != 8:
            raise NotImplementedError("4-bit embedding tables (llmc quantizes them to 8 bits)")
        n, k = (int(d) for d in codes.ty.shape)
        bb = imp.block_builder
        flat, lead, rows = self._flat_ids(imp, ids)
        key = ("embedding_nbits", n, k, group, int(zeros is not None))
        gv = self._kernel(imp, key, lambda: kernels.embedding_nbits(n, k, group, zeros is not None))
        z = zeros if zeros is not None else self._placeholder_zeros((1, 1))
        out = relax.TensorType([rows, k], "float32")
        out = bb.emit(relax.op.call_tir(gv, [flat, codes, scales, z], out))
        return bb.emit(relax.op.reshape(out, [*lead, k]))

    def embedding(self, node: fx.Node, imp) -> relax.Expr:
        w_node, ids_node = node.args[0], node.args[1]
        if not self._packable(imp, w_node):
            return imp._embedding_impl(imp.env[ids_node], imp.env[w_node])
        bb = imp.block_builder
        w, ids = imp.env[w_node], imp.env[ids_node]
        n, k = (int(d) for d in w.ty.shape)
        flat, lead, rows = self._flat_ids(imp, ids)
        gv = self._kernel(imp, ("embedding", n, k), lambda: kernels.embedding(n, k))
        packed = self._pack(imp, w)
        out = bb.emit(relax.op.call_tir(gv, [flat, packed], relax.TensorType([rows, k], "float32")))
        return bb.emit(relax.op.reshape(out, [*lead, k]))

    def index_select(self, node: fx.Node, imp) -> relax.Expr:
        """Rows picked by index (the logits' positions): indices clipped, never read out of
        bounds (TVM's default take trusts them)."""
        x, dim, index = imp.env[node.args[0]], int(node.args[1]), imp.env[node.args[2]]
        return imp.block_builder.emit(relax.op.take(x, index, axis=dim, mode="clip"))

    def index(self, node: fx.Node, imp) -> relax.Expr:
        """x[..., idx, ...] with one index tensor (Falcon's fused-QKV split) as a take along
        that axis, negative indices counted from the end as in PyTorch (TVM 0.27's importer reads
        uninitialised memory there); other forms its own way."""
        given = [(axis, i) for axis, i in enumerate(node.args[1]) if i is not None]
        if len(given) != 1:
            return imp._index_tensor(node)
        axis, index = given[0]
        x = imp.env[node.args[0]]
        return imp.block_builder.emit(relax.op.take(x, imp.env[index], axis=axis, mode="wrap"))

    def rms_norm(self, node: fx.Node, imp) -> relax.Expr:
        x, w, eps = imp.env[node.args[0]], imp.env[node.args[1]], float(node.args[2])
        return imp.block_builder.emit(relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=eps))

    def skip_rms_norm(self, node: fx.Node, imp) -> relax.Expr:
        x, residual = imp.env[node.args[0]], imp.env[node.args[1]]
        w, eps = imp.env[node.args[2]], float(node.args[3])
        bb = imp.block_builder
        total = bb.emit(relax.op.add(residual, x))
        norm = bb.emit(relax.op.nn.rms_norm(total, w, axes=[-1], epsilon=eps))
        return bb.emit(relax.Tuple([norm, total]))

    def rotary(self, node: fx.Node, imp) -> relax.Expr:
        x, cos, sin, pos = (imp.env[a] for a in node.args[:4])
        interleaved = bool(node.args[4])
        width, rot = int(x.ty.shape[-1]), 2 * int(cos.ty.shape[-1])
        gv = self._kernel(
            imp, ("rotary", width, rot, int(interleaved)), lambda: rotary(width, rot, interleaved)
        )
        return imp.block_builder.emit(relax.op.call_tir(gv, [x, cos, sin, pos], x.ty))

    def attention(self, node: fx.Node, imp) -> relax.Expr:
        q, k, v, past_k, past_v, lens = (imp.env[a] for a in node.args[:6])
        scale, window, softcap = float(node.args[7]), int(node.args[8]), float(node.args[9])
        _, kv_heads, _, d = past_k.ty.shape
        kv_heads, d = int(kv_heads), int(d)
        heads = int(q.ty.shape[-1]) // d
        bb = imp.block_builder
        write = self._kernel(imp, ("kv_write", kv_heads, d), lambda: kernels.kv_write(kv_heads, d))
        caches = bb.emit(
            relax.op.call_tir_inplace(
                write, [past_k, past_v, k, v, lens], [0, 1], [past_k.ty, past_v.ty]
            )
        )
        ck, cv = bb.emit(relax.TupleGetItem(caches, 0)), bb.emit(relax.TupleGetItem(caches, 1))
        key = ("attention", heads, kv_heads, d, round(scale, 8), window, softcap)
        attend = self._kernel(
            imp, key, lambda: kernels.attention(heads, kv_heads, d, scale, window, softcap)
        )
        out = bb.emit(relax.op.call_tir(attend, [q, ck, cv, lens], q.ty))
        return bb.emit(relax.Tuple([out, ck, cv]))
