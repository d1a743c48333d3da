"""Each pass: a positive case (golden counts, parity) and a negative case (nothing to do)."""

from __future__ import annotations

import pytest
import torch

from llmc.compiler.graph import Graph
from llmc.compiler.pass_manager import run_pipeline, select
from llmc.compiler.spec import ModelSpec
from llmc.compiler.trace import trace
from llmc.errors import LlmcError
from llmc.passes.eliminate_dead_code import EliminateDeadCode
from llmc.passes.remove_assertions import RemoveAssertions
from llmc.passes.remove_noop_casts import RemoveNoopCasts
from llmc.targets.onnx.pipeline import pipeline

# Golden per-pass match counts on each 2-layer tiny model (ONNX pipeline, in order).
GOLDEN = {
    "llama": {"remove_assertions": 17, "remove_noop_casts": 15, "eliminate_dead_code": 4},
    "qwen2": {"remove_assertions": 17, "remove_noop_casts": 15, "eliminate_dead_code": 4},
    "mistral": {"remove_assertions": 17, "remove_noop_casts": 15, "eliminate_dead_code": 4},
    "phi3": {"remove_assertions": 17, "remove_noop_casts": 15, "eliminate_dead_code": 4},
    "gemma": {"remove_assertions": 18, "remove_noop_casts": 16, "eliminate_dead_code": 4},
    "gpt2": {"remove_assertions": 4, "remove_noop_casts": 3, "eliminate_dead_code": 4},
}


def traced_graph(tiny_model, arch: str) -> Graph:
    model, _ = tiny_model(arch)
    spec = ModelSpec.from_config(model.config)
    result = trace(model, spec)
    return Graph(result.program, spec, result.input_names, result.output_names)


@pytest.mark.parametrize("arch", sorted(GOLDEN))
def test_pipeline_golden_counts_and_parity(arch, tiny_model):
    graph = traced_graph(tiny_model, arch)
    before = graph.op_histogram()
    reports = run_pipeline(graph, pipeline())
    assert {r.name: r.counts["removed"] for r in reports} == GOLDEN[arch]
    assert all(r.modified and r.max_abs_diff == 0.0 for r in reports)
    after = graph.op_histogram()
    assert "aten._assert_tensor_metadata.default" in before
    assert "aten._assert_tensor_metadata.default" not in after
    for op in (
        "aten.linear.default",
        "aten.addmm.default",
        "aten.embedding.default",
        "aten.scaled_dot_product_attention.default",
    ):
        assert after.get(op) == before.get(op), op  # nothing that computes was removed


def test_passes_on_a_clean_graph_report_unmodified(tiny_model):
    graph = traced_graph(tiny_model, "llama")
    run_pipeline(graph, pipeline())
    again = run_pipeline(graph, pipeline())  # second run: nothing left to do
    assert [(r.modified, r.counts["removed"]) for r in again] == [(False, 0)] * 3


def test_noop_cast_pass_keeps_real_casts():
    class M(torch.nn.Module):
        def forward(self, x):
            return x.to(torch.float16).to(torch.float32) + x.to(torch.float32)

    ep = torch.export.export(M(), (torch.randn(3),))
    graph = Graph(ep, spec=None, input_names=["x"], output_names=["y"])
    report = RemoveNoopCasts().run(graph)
    casts = [n for n in graph.fx.nodes if n.op == "call_function" and "to" in str(n.target)]
    # Only `x.to(float32)` on an f32 input is a no-op; the f16 round trip changes values.
    assert report.counts["removed"] == 1 and report.modified
    assert len(casts) == 2


def test_dead_code_pass_removes_only_unused():
    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1

    ep = torch.export.export(M(), (torch.randn(3),))
    graph = Graph(ep, spec=None, input_names=["x"], output_names=["y"])
    x = next(n for n in graph.fx.nodes if n.op == "placeholder")
    with graph.fx.inserting_after(x):
        graph.fx.call_function(torch.ops.aten.mul.Tensor, (x, x))  # nobody uses it
    report = EliminateDeadCode().run(graph)
    assert report.modified and report.counts == {"removed": 1}
    targets = [n.target for n in graph.fx.nodes if n.op == "call_function"]
    assert targets == [torch.ops.aten.add.Tensor]
    assert EliminateDeadCode().run(graph).modified is False
    assert RemoveAssertions().run(graph).modified is False


def test_select_disables_a_pass_and_rejects_unknown_names():
    names = [p.name for p in select(pipeline(), "-remove_noop_casts")]
    assert names == ["remove_assertions", "eliminate_dead_code"]
    with pytest.raises(LlmcError, match="not one of"):
        select(pipeline(), "-fuse_everything")
    with pytest.raises(LlmcError, match="names to disable"):
        select(pipeline(), "remove_assertions")
