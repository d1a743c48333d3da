"""What only the TVM target has: its kernels against numpy, weights outside the library, the
host CPU it was compiled for, the shared cache's slots and views. The conformance suite
(test_conformance.py) runs the rest on it: parity, greedy tokens, batches, extend and truncate,
speculative decoding, rows joining and leaving, perplexity, int8 and int4."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import llmc.runtime as rt  # noqa: E402
from llmc import quant_layout  # noqa: E402
from llmc.errors import ArtifactError  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    """The kernels at small, awkward sizes (N not a multiple of 16, K of 8), compiled once."""
    from llmc.targets.tvm import kernels
    from llmc.targets.tvm.emit import host_target

    funcs = {
        "pack": kernels.pack(37, 64),
        "pack_u8": kernels.pack(37, 64, "uint8"),
        "pack_u4": kernels.pack(37, 32, "uint8"),
        "pack_s": kernels.pack(37, 2, "float32"),
        "linear": kernels.linear(37, 64),
        "embedding": kernels.embedding(37, 64),
        "int8": kernels.linear_nbits(37, 64, 8, 32, False),
        "int4": kernels.linear_nbits(37, 64, 4, 32, True),
        "kv_write": kernels.kv_write(2, 16),
        "attention": kernels.attention(4, 2, 16, 0.25, 0, 0.0),
        "attention_window": kernels.attention(4, 2, 16, 0.25, 3, 20.0),
    }
    mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
    return tvm.compile(mod, target=host_target())


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def _packed(lib, kernel: str, w: np.ndarray):
    out = _t(np.zeros(((w.shape[0] + 15) // 16, w.shape[1], 16), w.dtype))
    lib[kernel](_t(w), out)
    return out


@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_linear_and_embedding_kernels(compiled, rows):
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((37, 64)).astype(np.float32)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    packed = _packed(compiled, "pack", w)
    y = _t(np.zeros((rows, 37), np.float32))
    compiled["linear"](_t(x), packed, y)
    assert np.abs(y.numpy() - x @ w.T).max() < 1e-4
    ids = np.array([0, 36, 17, 16, 15])
    e = _t(np.zeros((5, 64), np.float32))
    compiled["embedding"](_t(ids), packed, e)
    assert np.array_equal(e.numpy(), w[ids])  # the tied table read out of the packed lm_head


@pytest.mark.parametrize(("bits", "kernel"), [(8, "int8"), (4, "int4")])
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_linear_kernels(compiled, bits, kernel, rows):
    """Dequantization fused into the matmul equals llmc's dequantize-then-multiply, with
    fractional zero points (a GGUF Q4_1 grid kept exactly) for 4 bits."""
    rng = np.random.default_rng(bits + rows)
    codes = rng.integers(0, 2**bits, (37, 64)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (37, 2)).astype(np.float32)
    zeros = rng.uniform(0, 2**bits - 1, (37, 2)).astype(np.float32) if bits == 4 else None
    zero = zeros if zeros is not None else float(quant_layout.symmetric_zero(bits))
    w = quant_layout.dequantize_codes(codes, scales, zero, 32)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    q = _packed(compiled, "pack_u8" if bits == 8 else "pack_u4", quant_layout.pack(codes, bits))
    s = _packed(compiled, "pack_s", scales)
    z = (
        _packed(compiled, "pack_s", zeros)
        if zeros is not None
        else _t(np.zeros((1, 1, 16), np.float32))
    )
    y = _t(np.zeros((rows, 37), np.float32))
    compiled[kernel](_t(x), q, s, z, y)
    assert np.abs(y.numpy() - x @ w.T).max() < 1e-4


def _reference_attention(q, ck, cv, starts, window, softcap, heads, d):
    b, s, _ = q.shape
    kv_heads = ck.shape[1]
    out = np.zeros_like(q)
    for r in range(b):
        for i in range(s):
            p = starts[r] + i
            keys = np.arange(p + 1)
            if window:
                keys = keys[keys > p - window]
            for h in range(heads):
                g = h // (heads // kv_heads)
                sc = ck[r, g, keys] @ q[r, i, h * d : (h + 1) * d] * 0.25
                if softcap:
                    sc = np.tanh(sc / softcap) * softcap
                pr = np.exp(sc - sc.max())
                out[r, i, h * d : (h + 1) * d] = (pr / pr.sum()) @ cv[r, g, keys]
    return out


@pytest.mark.parametrize(
    ("kernel", "window", "softcap"), [("attention", 0, 0.0), ("attention_window", 3, 20.0)]
)
def test_kv_write_and_attention_kernels(compiled, kernel, window, softcap):
    """Rows at different lengths (a ragged batch) write their keys in place at their own
    positions; each query sees its row's keys up to itself (and the window)."""
    rng = np.random.default_rng(0)
    b, s, cap, heads, kv_heads, d = 2, 3, 40, 4, 2, 16
    ck = rng.standard_normal((b, kv_heads, cap, d)).astype(np.float32)
    cv = rng.standard_normal((b, kv_heads, cap, d)).astype(np.float32)
    k = rng.standard_normal((b, s, kv_heads * d)).astype(np.float32)
    v = rng.standard_normal((b, s, kv_heads * d)).astype(np.float32)
    q = rng.standard_normal((b, s, heads * d)).astype(np.float32)
    starts = np.array([5, 20])
    tk, tv = _t(ck), _t(cv)
    compiled["kv_write"](tk, tv, _t(k), _t(v), _t((starts + s - 1).astype(np.int32)))
    for r in range(b):
        ck[r, :, starts[r] : starts[r] + s] = k[r].reshape(s, kv_heads, d).transpose(1, 0, 2)
        cv[r, :, starts[r] : starts[r] + s] = v[r].reshape(s, kv_heads, d).transpose(1, 0, 2)
    assert np.array_equal(tk.numpy(), ck) and np.array_equal(tv.numpy(), cv)
    o = _t(np.zeros_like(q))
    compiled[kernel](_t(q), tk, tv, _t((starts + s - 1).astype(np.int32)), o)
    want = _reference_attention(q, ck, cv, starts, window, softcap, heads, d)
    assert np.abs(o.numpy() - want).max() < 1e-5


def test_artifact_layout_and_host_check(tiny_artifact, tmp_path):
    """Weights live in params.bin, the library holds code only; the manifest records the CPU
    the library was compiled for, and a session refuses another one with a sentence."""
    path = tiny_artifact("llama", target="tvm")
    m = json.loads((path / "llmc.json").read_text())
    target = m["target"]
    library, params = path / target["library"], path / target["params"]
    index = target["param_index"]
    assert all(e["offset"] % 64 == 0 for e in index)  # mapped, not copied: aligned in the file
    weight_bytes = sum(np.prod(e["shape"]) * np.dtype(e["dtype"]).itemsize for e in index)
    assert params.stat().st_size >= weight_bytes and library.stat().st_size < 3e6
    assert target["cpu"] == tvm.target.codegen.llvm_get_system_cpu()
    assert m["build"]["peak_memory_gb"] > 0 and m["build"]["seconds"] > 0
    assert any(k.startswith("llmc_tvm::attention") for k in m["graph"]["op_histogram"])
    gen = rt.load(path)
    seq = gen.model.sequence()
    seq.add([[1, 2, 3], [4, 5]])
    seq.add([[6, 7, 8, 9]])  # joins: slots double from 2 to 4
    assert seq.kv_bytes >= 4 * 256 * 2 * 2 * 2 * 16 * 4  # slots x positions x K/V x layers x ...
    m["target"]["cpu"] = "some-other-cpu"
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)  # copies: links out of the artifact are refused
    (copy / "llmc.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="compiled for the CPU 'some-other-cpu'"):
        rt.load(copy)
