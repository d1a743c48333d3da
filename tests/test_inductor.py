"""The AOTInductor target beyond the conformance suite (which runs it on a spread of tiny
families): what its artifact holds, what it refuses, and SmolLM2 end to end."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import llmc.runtime as rt
from llmc.artifact import read_manifest
from llmc.cli import cli
from tests.test_tiny_end_to_end import hf_greedy


def test_package_runs_on_the_cpu_it_was_built_for(tiny_artifact):
    path = tiny_artifact("llama", target="inductor")
    manifest = read_manifest(path)
    target = manifest["target"]
    assert target["device"] == "cpu" and target["files"]["model"] == "model.pt2"
    assert target["inputs"][:3] == ["input_ids", "position_ids", "seqlens_k"]
    assert manifest["io"]["kv_mode"] == "shared"
    assert manifest["toolchain"]["torch"] == torch.__version__
    gen = rt.load(path)
    assert gen.model.device.type == "cpu"


def test_a_model_with_its_own_attention_is_refused_before_compiling(tmp_path):
    out = tmp_path / "falcon"
    result = CliRunner().invoke(
        cli, ["build", "tiny:falcon", "--target", "inductor", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "shared KV cache" in result.output and "--target onnx" in result.output
    assert not out.exists()


def test_targets_lists_torch_as_the_runtime():
    result = CliRunner().invoke(cli, ["targets"])
    assert result.exit_code == 0
    line = next(x for x in result.output.splitlines() if "inductor" in x)
    assert "AOTInductor" in line


@pytest.mark.slow
@pytest.mark.heavy
def test_smollm2_128_greedy_tokens_match_eager(tmp_path):
    """The issue's CPU bar: SmolLM2's package, verified, 128 greedy tokens identical to eager.
    Built without autotuning (2.5 instead of 4.5 min here; the kernels differ, the graph and
    runtime do not): bench/bench_decode.py --target inductor checks the autotuned build's 128
    greedy tokens against transformers while it times them."""
    from llmc.compiler import sources

    out = tmp_path / "smollm2-inductor"
    args = ["build", "--target", "inductor", "--no-autotune", "--out", str(out)]
    built = CliRunner().invoke(cli, args)
    assert built.exit_code == 0, built.output
    gen = rt.load(out)
    ver = gen.manifest["verification"]
    assert ver["passed"] and ver["max_abs_diff"] <= 1e-3 and ver["greedy_agreement"] == 18
    reference = sources.load(sources.resolve(None))
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    ids = gen.encode(messages)
    ours = [int(t[0]) for t in gen.generate_ids([ids], rt.GenerationConfig(128, ignore_eos=True))]
    assert ours == hf_greedy(reference.model, ids, 128)
