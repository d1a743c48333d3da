"""Drift attribution, the 4-bit precision plan (--max-ppl-increase with --quant int4), the
decode path of llmc eval, and one onnxruntime session for quantized artifacts (issue 20), on tiny
models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from llmc.artifact import read_manifest
from llmc.cli import cli
from llmc.compiler import precision as P
from llmc.compiler import quantize as Q

DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare-dev.txt")


def planned_graph(tiny_model, budget: float, model=None):
    from llmc.passes.quantize_weights import QuantConfig
    from tests.test_quantization import quantized_graph

    return quantized_graph(tiny_model, "llama", QuantConfig("int4", budget=budget), model)


def test_a_tighter_budget_promotes_more_and_meets_its_target(tiny_model):
    import copy

    from tests.test_quantization import with_outliers

    model = with_outliers(copy.deepcopy(tiny_model("llama")[0]))  # all-fast costs it much
    loose, reports = planned_graph(tiny_model, 0.5, model)
    tight, _ = planned_graph(tiny_model, 0.01, model)
    a, b = loose.quantization["plan"], tight.quantization["plan"]
    for plan in (a, b):
        assert sum(plan["forms"].values()) == reports["quantize_weights"].counts["quantized"]
        assert plan["calibration_increase"] <= plan["target"] or plan["forms"]["fast"] == 0
        searched = {s["promoted"]: s["increase"] for s in plan["search"][plan["chosen_order"]]}
        assert searched[plan["promoted"]] == plan["calibration_increase"]
    assert b["promoted"] > a["promoted"]  # all-fast costs it a few percent
    assert searched[0] > b["target"]
    # the forms chosen are the ones in the graph: 8-bit nodes for the promoted, 4-bit for the rest
    bits = [n.args[4] for n in tight.fx.nodes if n.target is torch.ops.llmc.linear_nbits.default]
    assert bits.count(8) == b["forms"]["int8"] and bits.count(4) == b["forms"]["fast"]
    assert tight.quantization["symmetric"] == "per layer (plan)"
    # 8-bit forms scale per INT8_GROUP input channels (tiny:llama's 64 and 128 divide by it),
    # 4-bit ones per 32; the 8-bit embedding table has the lm_head's group, so one copy is kept
    for node in tight.fx.nodes:
        if node.target is torch.ops.llmc.linear_nbits.default:
            assert node.args[5] == (P.INT8_GROUP if node.args[4] == 8 else 32)
        if node.target is torch.ops.llmc.embedding_nbits.default:
            assert node.args[4:6] == (8, P.INT8_GROUP)


def test_plans_are_scored_on_calibration_rows_gptq_does_not_fit():
    rows = [torch.arange(256) + 1000 * i for i in range(32)]  # the default 32 x 256
    scored, fitted = P.held_out(rows, P.PLAN_TOKENS)
    assert sum(len(r) for r in scored) == P.PLAN_TOKENS and len(fitted) == 24
    assert not {int(r[0]) for r in scored} & {int(r[0]) for r in fitted}  # disjoint rows
    scored, fitted = P.held_out(rows[:31], P.PLAN_TOKENS)  # GPTQ would keep under 3/4: no split
    assert scored is fitted


def test_drift_is_the_kl_of_quantizing_one_matmul(tiny_model):
    """Every quantized matmul's recorded drift is positive, the unquantized graph has none, and
    the number is the KL measured with only that weight replaced (recomputed here)."""
    graph, reports = planned_graph(tiny_model, 0.5)
    drift = graph.quantization["drift"]
    assert len(drift["layers"]) == reports["quantize_weights"].counts["quantized"]
    assert drift["tokens"] == 128 and -1 <= drift["proxy_spearman"] <= 1
    assert all(e["kl"] >= 0 for e in drift["layers"])
    fast = [e for e in drift["layers"] if e["form"] == "fast"]
    assert fast and all(e["kl"] > 0 for e in fast)


def test_probe_measures_nothing_for_an_unchanged_weight_and_something_for_a_changed_one(
    tiny_model,
):
    from llmc.compiler.graph import Graph
    from llmc.compiler.pass_manager import PassContext, run_pipeline, trace_options
    from llmc.compiler.spec import ModelSpec
    from llmc.compiler.trace import trace
    from llmc.targets.onnx.pipeline import pipeline

    model = tiny_model("llama")[0]
    spec = ModelSpec.from_config(model.config)
    passes, ctx = pipeline(), PassContext()
    g = Graph.from_trace(trace(model, spec, options=trace_options(passes, model, ctx)), spec)
    run_pipeline(g, passes, ctx)
    linear = next(n for n in g.fx.nodes if n.target is torch.ops.aten.linear.default)
    feed, w = linear.args[1], g.tensor(linear.args[1])
    ids = torch.randint(0, spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    probe = P.Probe(g, list(ids), 64)
    assert probe.tokens == 64
    assert probe.kl({feed: w.clone()}) == pytest.approx(0, abs=1e-9)
    q = Q.rtn(w, 4, 32, sym=True).dequantize()
    small, large = probe.kl({feed: q}), probe.kl({feed: w + 0.5 * w.std() * torch.randn_like(w)})
    assert 0 < small < large


def test_unit_alternative_is_the_best_gain_per_cost():
    u = P.Unit(None, "x", torch.zeros(4, 32), None, False)
    u.forms = {"fast": None, "exact": None, "int8": None}
    u.kl = {"fast": 1.0, "exact": 0.0, "int8": 0.01}
    assert u.alternative == "int8"  # 0.99 per 1.0 cost beats 1.0 per 1.6
    u.kl["int8"] = 0.5
    assert u.alternative == "exact"
    assert P.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert P.spearman([1, 2], [1, 2]) is None


def test_planned_build_cli_records_and_shows_the_plan(tmp_path):
    out = tmp_path / "a"
    args = ["build", "tiny:llama", "-o", str(out), "--quant", "int4", "--max-ppl-increase", "5%"]
    result = CliRunner().invoke(cli, [*args, "--eval", DATA, "--eval-tokens", "300"])
    assert result.exit_code == 0, result.output
    assert "plan:" in result.output
    m = read_manifest(out)
    q, e = m["quantization"], m["evaluation"]
    assert q["max_ppl_increase"] == 0.05 and q["plan"]["budget"] == 0.05
    assert m["verification"]["passed"]
    assert e["increase"] <= 0.05 and "decode_path" in e
    shown = CliRunner().invoke(cli, ["inspect", str(out)])
    assert shown.exit_code == 0 and "plan" in shown.output and "drift" in shown.output


def test_default_quantized_build_records_drift_of_its_forms(tiny_artifact):
    m = read_manifest(tiny_artifact("llama", quant="int8"))
    layers = m["quantization"]["drift"]["layers"]
    assert {e["form"] for e in layers} == {"int8"} and all(e["kl"] >= 0 for e in layers)
    assert "plan" not in m["quantization"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quant", "int8", "--max-ppl-increase", "5%"], "needs --eval"),
        (["--quant", "int4", "--sym", "--max-ppl-increase", "5%"], "drop --sym/--asym"),
        (["--quant", "int4", "--drift-tokens", "0", "--max-ppl-increase", "5%"], "drift"),
    ],
)
def test_plan_flag_errors_exit_2(args, message, tmp_path):
    out = tmp_path / "a"
    result = CliRunner().invoke(cli, ["build", "tiny:llama", "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and not out.exists()


def test_eval_decode_path_scores_the_same_text_step_by_step(tiny_artifact):
    path = tiny_artifact("llama", quant="int8")
    base = ["eval", str(path), "--perplexity", DATA, "--max-tokens", "200", "--json"]
    prefill = json.loads(CliRunner().invoke(cli, base).output)
    decode = json.loads(CliRunner().invoke(cli, [*base, "--path", "decode"]).output)
    assert decode["path"] == "decode" and prefill["path"] == "prefill"
    assert decode["tokens"] == prefill["tokens"] == 199
    # other kernels, the same model: close, not necessarily equal
    assert decode["perplexity"] == pytest.approx(prefill["perplexity"], rel=0.02)
    fp32 = tiny_artifact("llama")
    base[1] = str(fp32)
    a = json.loads(CliRunner().invoke(cli, base).output)["perplexity"]
    b = json.loads(CliRunner().invoke(cli, [*base, "--path", "decode"]).output)["perplexity"]
    assert a == pytest.approx(b, rel=1e-4)  # fp32: the same numbers either way


def test_quantized_onnx_holds_one_session_where_prompts_run_fast(tiny_artifact, monkeypatch):
    import llmc.runtime as rt
    from llmc.targets.onnx.session import fast_prompts

    path = tiny_artifact("llama", quant="int4")
    model = rt.load(path).model
    assert (model.prefill_session is model.decode_session) == fast_prompts()
    monkeypatch.setenv("LLMC_EXACT_PROMPTS", "1")
    model = rt.load(path).model
    assert model.prefill_session is not model.decode_session and not model.fast_prompts
    assert model.session_for(8, False)[0] is model.prefill_session  # every prompt exact
    exact = rt.load(path, exact=True).model
    assert exact.prefill_session is exact.decode_session and exact.fast_kernels is None


def test_a_symmetric_only_target_plans_without_the_exact_grid(tmp_path):
    """TensorRT takes zero points of 0 only: on a source already on Q4_1 grids, where ONNX could
    keep the exact grid, its plan picks among 4-bit symmetric and 8 bits."""
    from llmc.compiler import tiny
    from tests.test_quantization import gridded_tiny_llama

    src = tmp_path / "gridded"
    gridded_tiny_llama(outliers=20).save_pretrained(src)
    tiny.build_tokenizer().save_pretrained(src)
    out = tmp_path / "a"
    args = ["build", str(src), "-t", "tensorrt", "-o", str(out), "--quant", "int4"]
    result = CliRunner().invoke(cli, [*args, "--max-ppl-increase", "0.5%"])
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    forms = m["quantization"]["plan"]["forms"]
    assert forms["exact"] == 0 and forms["int8"] > 0 and m["verification"]["passed"]
