"""Quantization: the algorithms against straightforward references on small matrices, the llmc
ops, the quantize_weights / split_zero_points passes, the MatMulNBits lowering (exact kernels
against the quantized graph), the recipe in the manifest, and the flags' errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from llmc import quant_layout
from llmc.artifact import read_manifest
from llmc.cli import cli
from llmc.compiler import ops as _ops  # noqa: F401  (registers the llmc ops)
from llmc.compiler import quantize as Q

llmc_ops = torch.ops.llmc
DATA = "../shared/data/tinyshakespeare-dev.txt"


# -- references: plain loops, one group at a time ----------------------------------------------


def rtn_reference(w: torch.Tensor, bits: int, group: int, sym: bool) -> torch.Tensor:
    """Dequantized round-to-nearest, written out group by group."""
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], group):
            g = w[r, c : c + group]
            if sym:  # the least-error scale of the searched ones, the first of equals
                top, largest = 2 ** (bits - 1) - 1, g.abs().max()
                best = None
                for scale in [largest / t * f for t in (top, top + 1) for f in Q.SEARCH]:
                    q = torch.clamp(torch.round(g / scale), -top - 1, top) * scale
                    if best is None or (q - g).square().sum() < (best - g).square().sum():
                        best = q
                out[r, c : c + group] = best
            else:
                lo, hi = min(g.min(), 0.0), max(g.max(), 0.0)
                scale = (hi - lo) / (2**bits - 1)
                zero = torch.round(-lo / scale)
                q = torch.clamp(torch.round(g / scale) + zero, 0, 2**bits - 1)
                out[r, c : c + group] = (q - zero) * scale
    return out


def gptq_reference(w, h, bits, group, sym, damp=0.01):
    """GPTQ without Cholesky or blocks: after quantizing column i, update the remaining columns
    with the row of the inverse Hessian, then remove column i from it (Schur complement)."""
    w = w.clone().double()
    h = h.clone().double()
    k = w.shape[1]
    h += torch.eye(k, dtype=h.dtype) * damp * h.diag().mean()
    hinv = torch.linalg.inv(h)
    out = torch.zeros_like(w)
    scale = zero = None
    for i in range(k):
        if i % group == 0:
            scale, zero = Q.grid(w[:, i : i + group], bits, sym)
        q = torch.clamp(torch.round(w[:, i] / scale) + zero, 0, 2**bits - 1)
        out[:, i] = (q - zero) * scale
        err = (w[:, i] - out[:, i]) / hinv[i, i]
        w[:, i + 1 :] -= err[:, None] * hinv[i, i + 1 :][None, :]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return out.float()


def correlated_inputs(k: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(n, k, generator=g) @ mix + 0.1 * torch.randn(n, k, generator=g)
    return x * torch.linspace(0.2, 3.0, k)  # some channels matter more


@pytest.mark.parametrize(("bits", "sym"), [(4, False), (4, True), (8, True), (8, False)])
def test_rtn_matches_the_loop_reference(bits, sym):
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(bits))
    q = Q.rtn(w, bits, 32, sym, keep_grids=False)
    assert torch.allclose(q.dequantize(), rtn_reference(w, bits, 32, sym), atol=1e-6)
    assert int(q.codes.max()) < 2**bits and q.scales.shape == (6, 4)
    assert torch.equal(quant_layout.unpack(q.packed(), bits), q.codes)
    per_row = Q.rtn(w, bits, 128, sym, keep_grids=False)  # one group per row
    assert torch.allclose(per_row.dequantize(), rtn_reference(w, bits, 128, sym), atol=1e-6)


def test_symmetric_grids_use_the_bottom_level_and_keep_symmetric_sources_exact():
    g = torch.Generator().manual_seed(3)
    steps = torch.rand(8, 4, 1, generator=g) * 0.1 + 0.01
    codes = torch.randint(-8, 8, (8, 4, 32), generator=g)
    codes[..., 0] = -8  # GGUF Q4_0: the largest magnitude on the bottom level, -8 steps
    q4_0 = (codes * steps).view(8, 128)
    absmax = rtn_absmax(q4_0, 4)  # the plain absmax grid has no level for it
    assert (absmax - q4_0).abs().max() > 1e-3
    q = Q.rtn(q4_0, 4, 32, sym=True)
    assert (q.dequantize() - q4_0).abs().max() <= 1e-6 and int(q.codes.min()) == 0
    assert bool((q.scales > 0).all())
    q8_0 = (torch.randint(-127, 128, (8, 128), generator=g) * 0.01).float()
    q8_0[:, ::32] = 1.27  # every group reaches ±127 steps, as Q8_0's do
    assert (Q.rtn(q8_0, 8, 32, sym=True).dequantize() - q8_0).abs().max() <= 1e-6
    noise = torch.randn(64, 256, generator=g)  # off any grid: 19% less squared error
    searched = (Q.rtn(noise, 4, 32, sym=True).dequantize() - noise).square().sum()
    assert searched < 0.9 * (rtn_absmax(noise, 4) - noise).square().sum()


def rtn_absmax(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The symmetric grid before the search: largest magnitude on the top level, groups of 32."""
    top = 2 ** (bits - 1) - 1
    g = w.view(w.shape[0], -1, 32)
    scale = g.abs().amax(-1, keepdim=True) / top
    return (torch.round(g / scale).clamp(-top - 1, top) * scale).view_as(w)


def test_rtn_keeps_an_exact_grid_with_fractional_zeros():
    g = torch.Generator().manual_seed(1)
    steps = torch.rand(8, 4, 1, generator=g) * 0.1 + 0.01
    mins = -torch.rand(8, 4, 1, generator=g) * 0.5
    codes = torch.randint(0, 16, (8, 4, 32), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans its grid, as GGUF's Q4_1 does
    w = (codes * steps + mins).view(8, 128)
    q = Q.rtn(w, 4, 32, sym=False)
    assert not torch.equal(q.zeros, q.zeros.round())  # fractional zeros were kept
    assert (q.dequantize() - w).abs().max() <= 1e-6
    x = correlated_inputs(128, n=256)
    kept = Q.gptq(w, 2 * x.T @ x / 256, 4, 32, sym=False)  # no error to spread: the same grid
    assert (kept.dequantize() - w).abs().max() <= 1e-6
    plain = Q.rtn(w, 4, 32, sym=False, keep_grids=False)  # integer zeros shift every group
    assert (plain.dequantize() - w).abs().max() > 1e-3
    noise = torch.randn(8, 128, generator=g)  # weights not on a grid keep integer zeros
    assert torch.equal(Q.rtn(noise, 4, 32, False).zeros, Q.rtn(noise, 4, 32, False).zeros.round())


@pytest.mark.parametrize(("bits", "sym"), [(4, False), (4, True), (8, True)])
def test_gptq_matches_the_reference_and_beats_rtn(bits, sym):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(128)
    h = 2 * x.T @ x / len(x)
    ours = Q.gptq(w, h, bits, 32, sym, block=64).dequantize()
    assert torch.allclose(ours, gptq_reference(w, h, bits, 32, sym), atol=1e-4)
    rtn = Q.rtn(w, bits, 32, sym).dequantize()
    assert Q.output_error(w, ours, h) < 0.9 * Q.output_error(w, rtn, h)


def test_awq_search_never_worse_than_rtn_and_helps_with_salient_channels():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(1024, 128, generator=g)
    x[:, :4] *= 30  # a few salient input channels, as in real activations
    scale, alpha = Q.awq_scales([w], x, 4, 32, sym=False)
    assert alpha > 0 and scale.shape == (128,)
    awq = Q.rtn(w * scale, 4, 32, False).dequantize() / scale
    rtn = Q.rtn(w, 4, 32, False).dequantize()

    def loss(w_hat):
        return float((x @ w_hat.T - x @ w.T).pow(2).mean())

    assert loss(awq) < 0.8 * loss(rtn)
    # an exact grid is already lossless: the search keeps alpha 0 (plain RTN)
    grid_w = Q.rtn(w, 4, 32, False).dequantize()
    assert Q.awq_scales([grid_w], x, 4, 32, sym=False)[1] == 0.0


def test_llmc_ops_compute_the_dequantized_product():
    g = torch.Generator().manual_seed(4)
    w, x, bias = (
        torch.randn(12, 64, generator=g),
        torch.randn(2, 3, 64, generator=g),
        torch.randn(12),
    )
    for bits, sym in ((4, False), (8, True)):
        q = Q.rtn(w, bits, 32, sym)
        zeros = None if sym else q.zeros
        y = llmc_ops.linear_nbits(x, q.packed(), q.scales, zeros, bits, 32, bias)
        assert torch.allclose(y, torch.nn.functional.linear(x, q.dequantize(), bias), atol=1e-5)
        ids = torch.tensor([[0, 5, 11]])
        rows = llmc_ops.embedding_nbits(ids, q.packed(), q.scales, zeros, bits, 32)
        assert torch.equal(rows, q.dequantize()[ids])


# -- the passes on tiny graphs ---------------------------------------------------------------------


def quantized_graph(tiny_model, arch, config, model=None):
    from llmc.compiler.graph import Graph
    from llmc.compiler.pass_manager import PassContext, run_pipeline, trace_options
    from llmc.compiler.spec import ModelSpec
    from llmc.compiler.trace import trace
    from llmc.targets.onnx.pipeline import pipeline

    model = model if model is not None else tiny_model(arch)[0]
    spec = ModelSpec.from_config(model.config)
    passes, ctx = pipeline(quant=config), PassContext()
    if config.calibrated:
        ids = torch.randint(0, spec.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
        ctx.calibration = list(ids)
    options = trace_options(passes, model, ctx)
    graph = Graph.from_trace(trace(model, spec, options=options), spec)
    return graph, {r.name: r for r in run_pipeline(graph, passes, ctx)}


def test_quantize_weights_policy_counts_and_notes(tiny_model):
    from llmc.passes.quantize_weights import QuantConfig

    graph, reports = quantized_graph(tiny_model, "llama", QuantConfig("int4"))
    r = reports["quantize_weights"]
    # 2 layers x (qkv, o, gate, up, down) at 4 bits, the lm_head at 8, the embedding at 8
    assert r.counts == {"quantized": 11, "int4": 10, "int8": 1, "fp32": 0, "embeddings": 1}
    assert any("lm_head keeps 8 bits" in n for n in r.notes)
    assert graph.count(torch.ops.aten.linear.default) == 0
    assert graph.count(llmc_ops.linear_nbits.default) == 11
    assert graph.count(llmc_ops.embedding_nbits.default) == 1
    assert r.max_abs_diff is not None and r.max_abs_diff > 0  # lossy, recorded
    assert graph.quantization["bits"] == 4 and graph.quantization["symmetric"] is False

    strict = QuantConfig("int4", int8_threshold=0.0)  # every layer is "too lossy": all 8-bit
    _, reports = quantized_graph(tiny_model, "llama", strict)
    assert reports["quantize_weights"].counts["int8"] == 11
    assert sum("; 8 bits" in n for n in reports["quantize_weights"].notes) == 10

    wide = QuantConfig("int4", group=256)  # does not divide the tiny models' 64/128 inputs
    _, reports = quantized_graph(tiny_model, "llama", wide)
    r = reports["quantize_weights"]
    assert r.counts["fp32"] == 11 and r.counts["quantized"] == 0
    assert "not a multiple of 256; fp32" in r.notes[0]


def test_split_zero_points_is_exact_on_a_gridded_model(tiny_model):
    from llmc.passes.quantize_weights import QuantConfig

    model = gridded_tiny_llama()
    graph, reports = quantized_graph(tiny_model, "llama", QuantConfig("int4"), model=model)
    assert reports["split_zero_points"].counts == {"split": 10}  # the lm_head is 8-bit sym
    assert reports["split_zero_points"].max_abs_diff <= 1e-5
    assert reports["quantize_weights"].max_abs_diff <= 1e-5  # the grid was kept: no loss
    for node in graph.fx.nodes:
        if node.target == llmc_ops.linear_nbits.default and node.args[3] is not None:
            zeros = graph.tensor(node.args[3])
            assert torch.equal(zeros, zeros.round())


def test_split_zero_points_leaves_integer_zeros_alone(tiny_model):
    from llmc.passes.quantize_weights import QuantConfig

    _, reports = quantized_graph(tiny_model, "llama", QuantConfig("int4"))
    assert reports["split_zero_points"].counts == {"split": 0}
    assert not reports["split_zero_points"].modified


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_run_on_the_graph(method, tiny_model):
    from llmc.passes.quantize_weights import QuantConfig

    graph, reports = quantized_graph(tiny_model, "llama", QuantConfig(method))
    r = reports["quantize_weights"]
    assert r.counts["quantized"] == 11
    if method == "awq":
        assert any(n.startswith("awq:") for n in r.notes)


def with_outliers(model, factor: float = 100.0):
    """`model` with one weight of every group of 32 input channels of its projections made
    `factor` times larger: a 4-bit grid then has little room for the rest, so that quantizing
    costs a random tiny model's perplexity something (without them all-fast moves it by under
    1%, either way) and a plan promotes."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                mod.weight.view(-1, 32)[:, 0] *= factor
    return model


def gridded_tiny_llama(outliers: float = 0.0):
    """tiny:llama snapped to the grids of a GGUF Q4_1 file: projections on Q4_1's (16 levels
    from each group's minimum), the embedding and lm_head on Q8_0's (symmetric, ±127)."""
    from llmc.compiler import tiny

    model = tiny.build_model("llama")
    model = with_outliers(model, outliers) if outliers else model
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear | torch.nn.Embedding):
                n, k = mod.weight.shape
                g = mod.weight.view(n, k // 32, 32)
                if isinstance(mod, torch.nn.Embedding) or "lm_head" in name:
                    step = (g.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-6)
                    mod.weight.copy_((torch.round(g / step) * step).view(n, k))
                    continue
                lo = g.amin(-1, keepdim=True)
                step = ((g.amax(-1, keepdim=True) - lo) / 15).clamp(min=1e-6)
                mod.weight.copy_((torch.round((g - lo) / step) * step + lo).view(n, k))
    return model


# -- artifacts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quant", "extra"),
    [
        ("int4", ()),
        ("int8", ()),
        ("int4", ("--sym", "--group-size", "0")),
        ("gptq", ()),
        ("awq", ()),
    ],
)
def test_quantized_artifact_is_exact_against_its_graph(quant, extra, tmp_path):
    out = tmp_path / "a"
    args = ["build", "tiny:llama", "-o", str(out), "--quant", quant, *extra]
    args += ["--calib", DATA, "--calib-samples", "4", "--calib-seqlen", "64"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    ver = m["verification"]
    assert ver["passed"] and ver["reference"] == "pytorch-llmc-graph" and ver["max_abs_diff"] < 1e-4
    assert "fast_kernels" in ver
    q = m["quantization"]
    assert q["method"] == quant and q["bits"] == (8 if quant == "int8" else 4)
    # every method records its calibration text: GPTQ/AWQ fit to it, and every build measures
    # each matmul's drift on it
    assert q["calibration"]["samples"] == 4 and len(q["calibration"]["sha256"]) == 64
    assert len(q["drift"]["layers"]) == 11 and q["drift"]["tokens"] == 128
    ops = m["graph"]["op_histogram"]
    assert ops["com.microsoft::MatMulNBits"] == 11 and "MatMul" not in ops
    assert ops["com.microsoft::GatherBlockQuantized"] == 1
    shown = " ".join(CliRunner().invoke(cli, ["inspect", str(out)]).output.split())  # unwrapped
    assert f"quant {quant}: " in shown and "fast kernels (the default" in shown
    assert "MatMulNBits accuracy level 4" in shown and "measured on" in shown
    if quant in ("int4", "int8"):  # RTN: the lm_head's rows lie within half a step of fp32
        check_rescorer_rows(out, m)


def check_rescorer_rows(out, manifest):
    """The fast decode session rescores its top logits from the lm_head rows it reads out of
    onnxruntime's layout: they must be the model's lm_head, rounded to its 8-bit grid."""
    from llmc.compiler import tiny
    from llmc.targets.onnx.rescore import TOP
    from llmc.targets.onnx.session import Model

    rescore = Model(out, manifest).lm_head_rows
    assert rescore is not None and rescore.bits == 8 and rescore.in_graph
    w = tiny.build_model("llama").lm_head.weight.detach().numpy()
    rows = rescore.rows(np.arange(w.shape[0]))
    step = np.repeat(rescore.scales, rescore.block, 1)[:, : w.shape[1]]
    inside = np.abs(w) <= 127.5 * step  # the searched scale may clip a group's extremes:
    assert rows.shape == w.shape and np.all(np.abs(rows - w)[inside] <= 0.5 * step[inside] + 1e-6)
    assert np.all(np.abs(rows[~inside]) >= 127 * step[~inside] - 1e-6)  # to its end levels
    h = np.random.default_rng(0).standard_normal((1, w.shape[1])).astype(np.float32)
    logits = (h @ w.T).astype(np.float32) + 1.0  # rescoring replaces exactly the top TOP
    before = logits.copy()
    rescore(logits, h)
    top = np.argsort(before[0])[-TOP:]
    assert np.allclose(logits[0, top], rows[top] @ h[0], atol=1e-5)
    rest = np.setdiff1d(np.arange(w.shape[0]), top)
    assert np.array_equal(logits[0, rest], before[0, rest])
    # the tied table is stored once: the embedding gathers the lm_head's codes through Reshape
    import onnx

    model = onnx.load(str(out / manifest["target"]["files"]["model"]), load_external_data=False)
    made_by = {o: n for n in model.graph.node for o in n.output}
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(
        n
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
        and n.input[1] in {i for r in model.graph.node if r.op_type == "Reshape" for i in r.input}
    )
    for j, k in ((0, 1), (2, 2)):
        assert made_by[gather.input[j]].op_type == "Reshape"
        assert made_by[gather.input[j]].input[0] == head.input[k]


def test_the_session_corrects_its_top_logits_as_the_rescorer_does(tiny_artifact, monkeypatch):
    """A quantized artifact's fast session computes its exact top logits itself (TopK, the
    candidates' rows gathered from the lm_head's codes, scattered back): the same logits as the
    Python rescorer on the lm_head's input, at every position and row of prefill, decode and
    extend, and nothing is left for the runtime to rescore."""
    import llmc.runtime as rt
    from llmc.targets.onnx.session import Model

    art = tiny_artifact("llama", quant="int8")
    ours = rt.load(art).model
    monkeypatch.setattr(Model, "rescore_in_graph", False)
    python = rt.load(art).model
    assert ours.lm_head_rows.in_graph and ours.rescore is None
    assert python.rescore is not None and not python.rescore.in_graph
    ids = np.random.default_rng(0).integers(0, ours.vocab_size, (2, 9))
    a, b = ours.sequence(), python.sequence()
    pairs = [(a.prefill(ids), b.prefill(ids))]
    for step in range(3):
        pairs.append((a.decode(ids[:, step : step + 1]), b.decode(ids[:, step : step + 1])))
    pairs.append((a.extend(ids[:, :4]), b.extend(ids[:, :4])))
    for x, y in pairs:
        assert x.shape == y.shape and np.allclose(x, y, atol=1e-5)
    # and the correction does something: the fast kernels' own logits (the Python-rescored
    # session's, before rescoring) differ from these
    fast = python.decode_session.run(["logits"], _feeds(python, ids))[0]
    assert not np.allclose(fast[:, -1], pairs[0][0], atol=1e-5)


def _feeds(model, ids):
    """Inputs of one fresh prefill step of `ids` on an ONNX model's fast session (an empty
    cache of the shared-KV layout, every row's last position)."""
    io, (b, s) = model.io, ids.shape
    feeds = {
        "input_ids": ids,
        "position_ids": np.tile(np.arange(s), (b, 1)),
        "seqlens_k": np.full(b, s - 1, np.int32),
        "logits_index": np.array([s - 1]),
    }
    shape = (b, io.cache.kv_heads, s, io.cache.head_dim)
    feeds.update({name: np.zeros(shape, np.float32) for name in io.past_inputs})
    return {k: v for k, v in feeds.items() if k in model.inputs}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("vocab", [512, 2048])  # one TopK; two stages over chunks of the row
def test_in_graph_correction_matches_the_rescorer_at_either_width(bits, vocab, tmp_path):
    """A symmetric lm_head of 4 or 8 bits (a precision plan may give it 4) is corrected inside
    the session: on a lone MatMulNBits lm_head at accuracy level 4, the in-graph logits equal
    the fast kernel's with the numpy rescorer's exact top values put in, over several rows and
    positions, and they do differ from the fast kernel's own."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from llmc.targets.onnx.rescore import TOP, LmHeadRescorer, rescore_positions

    rng = np.random.default_rng(bits)
    n, k, block = vocab, 64, 32
    codes = rng.integers(0, 256, (n, k // block, block * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.05, n * k // block).astype(np.float32)
    head = helper.make_node(
        "MatMulNBits",
        ["h", "codes", "scales"],
        ["logits"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=4,
    )
    graph = helper.make_graph(
        [head],
        "lm_head",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, None, k])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, None, n])],
        [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales")],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    models = [helper.make_model(graph, opset_imports=opsets) for _ in range(2)]
    in_graph = LmHeadRescorer.attach(models[0], tmp_path, n, in_graph=True)
    python = LmHeadRescorer.attach(models[1], tmp_path, n, in_graph=False)
    assert in_graph.in_graph and not python.in_graph and in_graph.bits == bits

    def session(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    h = rng.standard_normal((3, 2, k)).astype(np.float32)
    (corrected,) = session(models[0]).run(["logits"], {"h": h})
    fast, hidden = session(models[1]).run(["logits", python.output], {"h": h})
    expected = fast.copy()
    rescore_positions(python, expected, hidden)  # every row and position, its own top TOP
    assert np.allclose(corrected, expected, atol=1e-5)
    assert not np.allclose(corrected, fast, atol=1e-5)
    w = python.rows(np.arange(n))  # the rescorer's exact values: the dequantized rows
    top = np.argsort(fast[0, 0])[-TOP:]
    assert np.allclose(corrected[0, 0, top], w[top] @ h[0, 0], atol=1e-4)
    assert onnx.checker.check_model(models[0]) is None


def test_a_group_per_row_of_no_power_of_two_gets_blocks_onnxruntime_takes():
    """`--group-size 0` on a hidden size like SmolLM2's 576: the 8-bit embedding table and the
    lm_head that shares it get blocks of 64 (their one scale per row repeated), so onnxruntime
    loads them and computes the llmc grid's numbers, and the tied table is still stored once."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from llmc.targets.onnx import layouts

    rng = np.random.default_rng(0)
    n, k = 40, 576
    codes = rng.integers(0, 256, (n, k), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.05, (n, 1)).astype(np.float32)
    table = (codes.astype(np.float32) - 128) * scales  # symmetric: the midpoint is zero
    ms = "com.microsoft"
    nodes = [
        helper.make_node("GatherBlockQuantized", ["codes", "ids", "scales"], ["e"], domain=ms,
                         bits=8, block_size=k, gather_axis=0, quantize_axis=1),
        helper.make_node("MatMulNBits", ["e", "head_codes", "head_scales"], ["logits"], domain=ms,
                         K=k, N=n, bits=8, block_size=k, accuracy_level=0),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales"),
         numpy_helper.from_array(codes.copy(), "head_codes"),
         numpy_helper.from_array(scales.copy(), "head_scales")],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ms, 1)]
    )
    assert layouts.apply(model) == 1
    blocks = {a.i for node in model.graph.node for a in node.attribute if a.name == "block_size"}
    assert blocks == {64}
    assert sum(t.data_type == TensorProto.UINT8 for t in model.graph.initializer) == 1  # once
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([3, 0, 39])
    (logits,) = session.run(["logits"], {"ids": ids})
    assert np.allclose(logits, table[ids] @ table.T, rtol=1e-4, atol=1e-3)


def test_two_stage_top_indices_find_the_largest_values_wherever_they_lie():
    """The graph's top-TOP indices through chunk maxima are TopK's set: with the largest values
    spread over the row, all in one chunk, on chunk edges, or in a row of equal maxima
    elsewhere; a vocabulary that does not split into chunks keeps one TopK."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from llmc.targets.onnx.rescore import CHUNK, TOP, _top_indices

    def session(n):
        graph = helper.make_graph(
            [],
            "top",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, n])],
            [helper.make_tensor_value_info("top", TensorProto.INT64, None)],
            [numpy_helper.from_array(np.array([TOP], np.int64), "k"),
             numpy_helper.from_array(np.array([-1], np.int64), "last")],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        nodes = _top_indices(model, "x", "top", n, "k", "last")
        model.graph.node.extend(nodes)
        return len(nodes), ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )

    n = CHUNK * 40
    count, two_stage = session(n)
    assert count > 1 and session(n + 8)[0] == 1  # 40 chunks; a row of n + 8 does not split
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, n)).astype(np.float32)
    x[1, 0, 5 * CHUNK : 5 * CHUNK + TOP] += 10  # all in one chunk
    x[1, 1, np.arange(TOP) * CHUNK + CHUNK - 1] += 10  # the last of TOP chunks
    x[1, 2, -TOP:] += 10  # the row's end
    x[2] = np.sort(x[2], axis=-1)  # ascending: the largest all in the last chunks
    x[3, :, ::CHUNK] = 50  # one equal maximum per chunk, the top TOP elsewhere
    x[3, :, 7 : 7 + TOP] = 60
    (got,) = two_stage.run(["top"], {"x": x})
    assert got.shape == (4, 3, TOP)
    for b in range(4):
        for p in range(3):
            want = np.argpartition(x[b, p], -TOP)[-TOP:]
            assert set(got[b, p].tolist()) == set(want.tolist()), (b, p)


def test_largest_finds_the_values_argpartition_finds():
    from llmc.targets.onnx.rescore import largest

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(40, 3000))
        row = (rng.standard_normal(n) * rng.uniform(0.01, 50)).astype(np.float32)
        if trial % 5 == 0:
            row[rng.integers(0, n, 10)] = -np.inf
        if trial % 7 == 0:
            row[: n // 2] = row.max()  # ties at the top
        k = int(rng.integers(1, 40))
        found = largest(row, k)
        assert len(set(found.tolist())) == k
        assert np.array_equal(np.sort(row[found]), np.sort(row)[-k:])


def test_gridded_model_builds_without_quantization_loss(tmp_path, tiny_model):
    from llmc.compiler import tiny

    src = tmp_path / "gridded"
    gridded_tiny_llama().save_pretrained(src)
    tiny.build_tokenizer().save_pretrained(src)
    out = tmp_path / "a"
    args = ["build", str(src), "-o", str(out), "--quant", "int4", "--eval", DATA]
    result = CliRunner().invoke(cli, [*args, "--eval-tokens", "300"])
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    # int4 reproduces the grid: no loss on the exact kernels (the default session's prompts run
    # on int8-activation kernels where the CPU has int8 dot products)
    exact = m["evaluation"].get("exact", m["evaluation"])
    assert abs(exact["increase"]) < 1e-4
    split = next(p for p in m["passes"] if p["name"] == "split_zero_points")
    assert split["counts"]["split"] == 10


def test_quality_gate_refuses_and_writes_nothing(tmp_path):
    out = tmp_path / "a"
    args = ["build", "tiny:llama", "-o", str(out), "--quant", "int4", "--no-plan", "--eval", DATA]
    result = CliRunner().invoke(cli, [*args, "--eval-tokens", "300", "--max-ppl-increase", "0.01%"])
    assert result.exit_code == 3, result.output
    assert "quality gate failed" in result.output and "--max-ppl-increase" in result.output
    assert not out.exists() and not list(tmp_path.glob(".a*"))
    result = CliRunner().invoke(cli, [*args, "--eval-tokens", "300", "--max-ppl-increase", "50%"])
    assert result.exit_code == 0, result.output
    evaluation = read_manifest(out)["evaluation"]
    assert evaluation["max_increase"] == 0.5 and evaluation["increase"] > 0
    assert evaluation["reference"]["engine"] == "pytorch-fp32"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quant", "int4", "--group-size", "48"], "power of two"),
        (["--sym"], "only apply with --quant"),
        (["--max-ppl-increase", "5%"], "needs --eval"),
        (["--quant", "gptq", "--calib", "/nonexistent.txt"], "is not a file"),
        (["--eval", "/nonexistent.txt"], "is not a file"),
        (["--quant", "int4", "--eval", DATA, "--max-ppl-increase", "abc"], "percentage"),
    ],
)
def test_bad_quantization_flags_exit_2_with_one_sentence(args, message, tmp_path):
    out = tmp_path / "a"
    result = CliRunner().invoke(cli, ["build", "tiny:llama", "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and not out.exists()


def test_eval_command_matches_the_build_record(tmp_path, tiny_artifact):
    path = tiny_artifact("llama")
    args = ["eval", str(path), "--perplexity", DATA, "--max-tokens", "300", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    first = json.loads(result.output)
    assert first["tokens"] == 299 and first["windows"] >= 1 and first["perplexity"] > 1
    again = CliRunner().invoke(cli, [*args[:-1], "--window", "64", "--stride", "32", "--json"])
    second = json.loads(again.output)
    assert second["windows"] > first["windows"]  # shorter context: a different number
    missing = CliRunner().invoke(cli, ["eval", str(path), "--perplexity", "/none.txt"])
    assert missing.exit_code == 2 and "is not a file" in missing.output


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "phi3", "gemma", "gpt2"])
def test_every_architecture_quantizes_every_projection(arch, tiny_artifact):
    m = read_manifest(tiny_artifact(arch, quant="int4"))
    assert m["verification"]["passed"] and m["verification"]["max_abs_diff"] < 1e-4
    counts = next(p for p in m["passes"] if p["name"] == "quantize_weights")["counts"]
    assert counts["fp32"] == 0 and counts["int8"] == 1  # the lm_head
    ops = m["graph"]["op_histogram"]
    assert ops["com.microsoft::MatMulNBits"] == counts["quantized"]
    assert not {"MatMul", "Gemm"} & set(ops)  # no fp32 projection left (gpt2: Conv1D too)


def test_default_calibration_text_ships_with_llmc(tiny_model):
    """GPTQ/AWQ calibrate on a text inside the package when no --calib is given, so an installed
    llmc needs no repository checkout; its hash and windows go in the manifest."""
    from llmc.compiler.calibration import DEFAULT_TEXT, calibration

    _, tokenizer = tiny_model("llama")
    calib = calibration(None, tokenizer, samples=32, seqlen=128, max_context=512)
    assert calib.file == "calibration.txt" and DEFAULT_TEXT.is_file()
    assert calib.samples >= 8 and all(len(row) == 128 for row in calib.rows)
    assert set(calib.record()) == {"file", "sha256", "samples", "seqlen"}


def test_a_quantized_onnx_artifact_whose_data_file_has_two_hard_links_runs(tiny_artifact, tmp_path):
    """An artifact built with the stage cache shares its files with the cache by hard links;
    the runtime reads the lm_head's weights for its rescorer itself (onnx's loader refuses a
    data file with more than one link)."""
    import os
    import shutil

    import llmc.runtime as rt

    out = tmp_path / "art"
    shutil.copytree(tiny_artifact("llama", quant="int8"), out)
    os.link(out / "model.onnx.data", tmp_path / "cache-copy.data")
    gen = rt.load(out)
    assert gen.model.lm_head_rows is not None
    steps = gen.generate_ids([gen.encode("hello")], rt.GenerationConfig(4, ignore_eos=True))
    assert len(list(steps)) == 4
