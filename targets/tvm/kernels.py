"""llmc's CPU kernels for the TVM target, written in TensorIR (TVMScript) for one model's sizes,
with the batch, sequence and context lengths left symbolic (one module serves prefill and decode).

Layouts, chosen for what a decode step is: a stream of weights read once.
- Linear weights are packed at load time (`pack`, lifted out of the step function by Relax's
  LiftTransformParams) from [N, K] to [N/16, K, 16]: sixteen output columns side by side, so the
  inner loop is one AVX-512 register of weights times one broadcast activation, the weights are
  read in order exactly once per step (one row; up to four rows share each load in a prompt),
  and the sixteen-column blocks are split between the cores.
- The tied embedding reads its rows out of the packed lm_head (`embedding`): one copy.
- The KV cache is one [B, KV heads, capacity, D] buffer per layer and kind, written in place at
  each row's positions (`kv_write`, Relax's call_tir_inplace); `attention` reads it with an
  online softmax over blocks of keys (no [S, T] score matrix), one task per query row and head.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

LANES = 16  # fp32 lanes of one AVX-512 register: the packed weights' inner width
ROWS = 4  # activation rows that share each weight load in a prompt's matmul
KEYS = 16  # keys per online-softmax block in attention
NEG = -3.0e38  # a masked score: finite, so that a block's max never turns into NaN


def blocks(n: int) -> int:
    return (n + LANES - 1) // LANES


def pack(n: int, k: int, dtype: str = "float32"):
    """w [N, K] -> [ceil(N/16), K, 16], columns past N zero."""
    nb = blocks(n)

    @T.prim_func(private=True)
    def pack_weight(w: T.Buffer((n, k), dtype), out: T.Buffer((nb, k, LANES), dtype)):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        for jo in T.parallel(nb):
            for kk in range(k):
                for ji in range(LANES):
                    out[jo, kk, ji] = T.if_then_else(
                        jo * LANES + ji < n, w[T.min(jo * LANES + ji, n - 1), kk], T.cast(0, dtype)
                    )

    return pack_weight


def linear(n: int, k: int):
    """y [M, N] = x [M, K] @ Wᵀ with W packed by `pack`."""
    nb = blocks(n)

    @T.prim_func(private=True)
    def linear_packed(x_h: T.handle, w: T.Buffer((nb, k, LANES), "float32"), y_h: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        for jo in T.parallel(nb):
            acc = T.decl_buffer((ROWS, LANES), "float32", scope="global")
            for mo in range(m // ROWS):
                for mi in T.unroll(ROWS):
                    for ji in T.vectorized(LANES):
                        acc[mi, ji] = T.float32(0)
                for kk in range(k):
                    for mi in T.unroll(ROWS):
                        for ji in T.vectorized(LANES):
                            acc[mi, ji] = acc[mi, ji] + x[mo * ROWS + mi, kk] * w[jo, kk, ji]
                for mi in T.unroll(ROWS):
                    for ji in range(LANES):
                        if jo * LANES + ji < n:
                            y[mo * ROWS + mi, jo * LANES + ji] = acc[mi, ji]
            for mr in range(m % ROWS):
                for ji in T.vectorized(LANES):
                    acc[0, ji] = T.float32(0)
                for kk in range(k):
                    for ji in T.vectorized(LANES):
                        acc[0, ji] = acc[0, ji] + x[m - m % ROWS + mr, kk] * w[jo, kk, ji]
                for ji in range(LANES):
                    if jo * LANES + ji < n:
                        y[m - m % ROWS + mr, jo * LANES + ji] = acc[0, ji]

    return linear_packed


def embedding(n: int, k: int):
    """out [M, K]: rows `ids` [M] of a [N, K] table packed by `pack`."""
    nb = blocks(n)

    @T.prim_func(private=True)
    def embedding_packed(ids_h: T.handle, w: T.Buffer((nb, k, LANES), "float32"), out_h: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        m = T.int64()
        ids = T.match_buffer(ids_h, (m,), "int64")
        out = T.match_buffer(out_h, (m, k), "float32")
        for i in range(m):
            for kk in range(k):
                out[i, kk] = w[ids[i] // LANES, kk, ids[i] % LANES]

    return embedding_packed


def kv_write(kv_heads: int, d: int):
    """Write the step's keys and values [B, S, KVH*D] into the caches [B, KVH, C, D] at each
    row's positions (seqlens [B]: the row's length after the step, minus one), in place."""

    @T.prim_func(private=True)
    def kv_write_inplace(
        ck_h: T.handle, cv_h: T.handle, k_h: T.handle, v_h: T.handle, lens_h: T.handle
    ):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        b, c, s = T.int64(), T.int64(), T.int64()
        ck = T.match_buffer(ck_h, (b, kv_heads, c, d), "float32", offset_factor=1)
        cv = T.match_buffer(cv_h, (b, kv_heads, c, d), "float32", offset_factor=1)
        k = T.match_buffer(k_h, (b, s, kv_heads * d), "float32")
        v = T.match_buffer(v_h, (b, s, kv_heads * d), "float32")
        lens = T.match_buffer(lens_h, (b,), "int32")
        for bi in range(b):  # a few KB per step: a parallel launch costs more
            for i in range(s):
                pos = T.cast(lens[bi], "int64") + 1 - s + i
                if pos >= 0 and pos < c:
                    for g in range(kv_heads):
                        for dd in T.vectorized(d):
                            ck[bi, g, pos, dd] = k[bi, i, g * d + dd]
                            cv[bi, g, pos, dd] = v[bi, i, g * d + dd]

    return kv_write_inplace


LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 split: n * LN2_HI is exact in fp32


def fast_exp(x):
    """e^x (fp32, relative error under 2e-7, inputs below -87 give ~0) from + - * and bit
    shifts, so that LLVM vectorizes it (its exp is a scalar libm call per lane): 2^n from the
    exponent bits times a degree-7 polynomial on the reduced argument."""
    x = T.max(x, T.float32(-87.0))
    n = T.round(x * T.float32(LOG2E))
    t = x - n * T.float32(LN2_HI) - n * T.float32(LN2_LO)
    poly = T.float32(1.0 / 5040)
    for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        poly = poly * t + T.float32(c)
    bits = T.shift_left(T.cast(n, "int32") + 127, 23)
    return poly * T.reinterpret("float32", bits)


def attention(heads: int, kv_heads: int, d: int, scale: float, window: int, softcap: float):
    """out [B, S, H*D]: causal attention of q [B, S, H*D] over the caches [B, KVH, C, D] that
    `kv_write` filled; query i of row b sits at seqlens[b] + 1 - S + i and sees the keys up to
    it (and, with a window, the last `window` of them). Soft-capped scores when softcap > 0.

    One task per (row, query, head); keys in blocks of 16: the 16 scores (each a dot product
    summed across one AVX-512 register, folded in halves), one rescale of the running output
    per block, the 16 exponentials as one vector (fast_exp)."""
    group = heads // kv_heads
    lanes = math.gcd(d, LANES)
    chunks = d // lanes
    cap = float(softcap)

    @T.prim_func(private=True)
    def attention_cached(
        q_h: T.handle, ck_h: T.handle, cv_h: T.handle, lens_h: T.handle, o_h: T.handle
    ):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        b, c, s = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, s, heads * d), "float32")
        ck = T.match_buffer(ck_h, (b, kv_heads, c, d), "float32", offset_factor=1)
        cv = T.match_buffer(cv_h, (b, kv_heads, c, d), "float32", offset_factor=1)
        lens = T.match_buffer(lens_h, (b,), "int32")
        o = T.match_buffer(o_h, (b, s, heads * d), "float32")
        for task in T.parallel(b * s * heads):
            acc = T.decl_buffer((d,), "float32", scope="global")
            part = T.decl_buffer((lanes,), "float32", scope="global")
            score = T.decl_buffer((KEYS,), "float32", scope="global")
            stat = T.decl_buffer((4,), "float32", scope="global")  # max, sum, block max, dot
            bi = task // (s * heads)
            i = task // heads % s
            h = task % heads
            g = h // group
            p = T.cast(lens[bi], "int64") + 1 - s + i
            first = T.max(p - window + 1, 0) if window > 0 else T.int64(0)
            for dd in T.vectorized(d):
                acc[dd] = T.float32(0)
            stat[0] = T.float32(NEG)
            stat[1] = T.float32(0)
            for jb in range((p + 1 - first + KEYS - 1) // KEYS):
                stat[2] = T.float32(NEG)
                for jj in range(KEYS):
                    j = first + jb * KEYS + jj
                    for ln in T.vectorized(lanes):
                        part[ln] = T.float32(0)
                    if j <= p:
                        for ch in range(chunks):
                            for ln in T.vectorized(lanes):
                                part[ln] = (
                                    part[ln]
                                    + q[bi, i, h * d + ch * lanes + ln]
                                    * ck[bi, g, j, ch * lanes + ln]
                                )
                    if lanes == LANES:  # fold the register in halves: 8, 4, then 4 scalars
                        for ln in T.vectorized(8):
                            part[ln] = part[ln] + part[ln + 8]
                        for ln in T.vectorized(4):
                            part[ln] = part[ln] + part[ln + 4]
                        stat[3] = (part[0] + part[1]) + (part[2] + part[3])
                    else:
                        stat[3] = T.float32(0)
                        for ln in range(lanes):
                            stat[3] = stat[3] + part[ln]
                    sc = stat[3] * T.float32(scale)
                    if cap > 0:
                        sc = T.tanh(sc / T.float32(cap)) * T.float32(cap)
                    score[jj] = T.if_then_else(j <= p, sc, T.float32(NEG))
                    stat[2] = T.max(stat[2], score[jj])
                top = T.max(stat[0], stat[2])
                corr = fast_exp(stat[0] - top)
                stat[1] = stat[1] * corr
                for dd in T.vectorized(d):
                    acc[dd] = acc[dd] * corr
                for jj in T.vectorized(KEYS):
                    score[jj] = T.if_then_else(
                        first + jb * KEYS + jj <= p, fast_exp(score[jj] - top), T.float32(0)
                    )
                for jj in range(KEYS):
                    j = first + jb * KEYS + jj
                    if j <= p:
                        stat[1] = stat[1] + score[jj]
                        for dd in T.vectorized(d):
                            acc[dd] = acc[dd] + score[jj] * cv[bi, g, j, dd]
                stat[0] = top
            for dd in T.vectorized(d):
                o[bi, i, h * d + dd] = acc[dd] / stat[1]

    return attention_cached


def linear_nbits(n: int, k: int, bits: int, group: int, zeros: bool):
    """y [M, N] = x [M, K] @ Wᵀ for W = (q - zero) * scale in groups of `group` inputs, with
    the codes packed by `pack` as bytes ([N/16, K*bits/8, 16]: a 4-bit byte holds inputs 2i
    (low nibble) and 2i+1) and scales and zeros ([N/16, K/group, 16]) likewise. Each group
    sums x·(q - zero) over its codes, then scales once; the weights are read as bytes and
    widened in registers (dequantization fused into the matmul). Without `zeros` the zero is
    2^(bits-1) (symmetric codes) and `z` is a placeholder."""
    nb, groups = blocks(n), k // group
    per = 8 // bits  # codes per byte
    width, span = k // per, group // per  # bytes per column, per group
    mid = float(2 ** (bits - 1))

    @T.prim_func(private=True)
    def linear_nbits_packed(
        x_h: T.handle,
        q: T.Buffer((nb, width, LANES), "uint8"),
        s: T.Buffer((nb, groups, LANES), "float32"),
        z_h: T.handle,
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        m, zn, zg = T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        z = T.match_buffer(z_h, (zn, zg, LANES), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        for jo in T.parallel(nb):
            acc = T.decl_buffer((ROWS, LANES), "float32", scope="global")
            part = T.decl_buffer((ROWS, LANES), "float32", scope="global")
            zero = T.decl_buffer((LANES,), "float32", scope="global")
            for mo in range(m // ROWS):
                for mi in T.unroll(ROWS):
                    for ji in T.vectorized(LANES):
                        acc[mi, ji] = T.float32(0)
                for g in range(groups):
                    for ji in T.vectorized(LANES):
                        zero[ji] = z[jo, g, ji] if zeros else T.float32(mid)
                    for mi in T.unroll(ROWS):
                        for ji in T.vectorized(LANES):
                            part[mi, ji] = T.float32(0)
                    for kk in range(span):
                        for mi in T.unroll(ROWS):
                            for ji in T.vectorized(LANES):
                                if bits == 8:
                                    part[mi, ji] = part[mi, ji] + x[
                                        mo * ROWS + mi, g * group + kk
                                    ] * (T.cast(q[jo, g * span + kk, ji], "float32") - zero[ji])
                                else:
                                    part[mi, ji] = (
                                        part[mi, ji]
                                        + x[mo * ROWS + mi, g * group + 2 * kk]
                                        * (
                                            T.cast(
                                                q[jo, g * span + kk, ji] & T.uint8(15), "float32"
                                            )
                                            - zero[ji]
                                        )
                                        + x[mo * ROWS + mi, g * group + 2 * kk + 1]
                                        * (
                                            T.cast(
                                                q[jo, g * span + kk, ji] >> T.uint8(4), "float32"
                                            )
                                            - zero[ji]
                                        )
                                    )
                    for mi in T.unroll(ROWS):
                        for ji in T.vectorized(LANES):
                            acc[mi, ji] = acc[mi, ji] + part[mi, ji] * s[jo, g, ji]
                for mi in T.unroll(ROWS):
                    for ji in range(LANES):
                        if jo * LANES + ji < n:
                            y[mo * ROWS + mi, jo * LANES + ji] = acc[mi, ji]
            for mr in range(m % ROWS):
                row = m - m % ROWS + mr
                for ji in T.vectorized(LANES):
                    acc[0, ji] = T.float32(0)
                for g in range(groups):
                    for ji in T.vectorized(LANES):
                        zero[ji] = z[jo, g, ji] if zeros else T.float32(mid)
                    for ji in T.vectorized(LANES):
                        part[0, ji] = T.float32(0)
                    for kk in range(span):
                        for ji in T.vectorized(LANES):
                            if bits == 8:
                                part[0, ji] = part[0, ji] + x[row, g * group + kk] * (
                                    T.cast(q[jo, g * span + kk, ji], "float32") - zero[ji]
                                )
                            else:
                                part[0, ji] = (
                                    part[0, ji]
                                    + x[row, g * group + 2 * kk]
                                    * (
                                        T.cast(q[jo, g * span + kk, ji] & T.uint8(15), "float32")
                                        - zero[ji]
                                    )
                                    + x[row, g * group + 2 * kk + 1]
                                    * (
                                        T.cast(q[jo, g * span + kk, ji] >> T.uint8(4), "float32")
                                        - zero[ji]
                                    )
                                )
                    for ji in T.vectorized(LANES):
                        acc[0, ji] = acc[0, ji] + part[0, ji] * s[jo, g, ji]
                for ji in range(LANES):
                    if jo * LANES + ji < n:
                        y[row, jo * LANES + ji] = acc[0, ji]

    return linear_nbits_packed


def embedding_nbits(n: int, k: int, group: int, zeros: bool):
    """out [M, K]: rows `ids` [M] of an 8-bit table in llmc's layout (codes [N, K], scales and
    zeros [N, K/group]), dequantized as llmc::embedding_nbits defines it."""
    groups = k // group

    @T.prim_func(private=True)
    def embedding_nbits_rows(
        ids_h: T.handle,
        q: T.Buffer((n, k), "uint8"),
        s: T.Buffer((n, groups), "float32"),
        z_h: T.handle,
        out_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        m, zn, zg = T.int64(), T.int64(), T.int64()
        ids = T.match_buffer(ids_h, (m,), "int64")
        z = T.match_buffer(z_h, (zn, zg), "float32")
        out = T.match_buffer(out_h, (m, k), "float32")
        for i in range(m):
            for kk in range(k):
                out[i, kk] = (
                    T.cast(q[ids[i], kk], "float32")
                    - (z[ids[i], kk // group] if zeros else T.float32(128))
                ) * s[ids[i], kk // group]

    return embedding_nbits_rows
