"""The TensorRT target as far as it runs here (no TensorRT exists on this project's machines):
the standard-ONNX network of every tiny family runs in onnxruntime with PyTorch's greedy tokens,
passes the table of what TensorRT's parser takes, and comes with a build spec whose profiles
cover the context; quantized networks dequantize block-wise with zero points of 0; `llmc build`
says what is missing for the engine, `llmc run` refuses with the same advice. Nothing here
pretends that an engine was built."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from llmc.artifact import read_manifest
from llmc.cli import cli
from llmc.runtime import GenerationConfig, Generator
from llmc.runtime.tokenizer import Tokenizer
from llmc.targets.tensorrt import engine, parser_support
from llmc.targets.tensorrt.session import VerifyModel
from tests.conftest import TINY_ARCHS, heavy_where
from tests.test_tiny_end_to_end import PROMPT, hf_greedy

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None,
    reason="TensorRT is installed: these tests cover the path without it",
)


def verify_generator(path) -> Generator:
    """The network in onnxruntime behind the shared generator."""
    manifest = read_manifest(path)
    return Generator(
        VerifyModel.open(path, manifest), Tokenizer(path, manifest["generation"]), manifest
    )


def check_network(path) -> onnx.ModelProto:
    """Standard ONNX only, what TensorRT's parser takes, a spec that covers the context."""
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert max(o.version for o in model.opset_import) == 23
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert parser_support.check(model) == []
    spec = json.loads((path / engine.SPEC_FILE).read_text())
    manifest = read_manifest(path)
    context = manifest["io"]["max_context"]
    inputs = {i.name for i in model.graph.input}
    for profile in spec["profiles"]:
        assert set(profile["shapes"]) == inputs
        for shape in profile["shapes"].values():
            assert all(a <= b <= c for a, b, c in zip(*shape.values(), strict=True))
    prefill, decode = (p["shapes"] for p in spec["profiles"])
    assert prefill["input_ids"]["max"][1] == context  # a whole-context prompt in one step
    assert prefill["attention_mask"]["max"][1] == context
    assert decode["attention_mask"]["max"][1] == context  # decode up to the last position
    past = manifest["io"]["past_inputs"][0]
    assert max(p[past]["max"][2] for p in (prefill, decode)) == context - 1
    assert spec["trtexec"].startswith("trtexec --onnx=model.onnx --stronglyTyped")
    assert manifest["target"]["engine"] is None  # no engine was built here
    assert "tensorrt is not installed" in manifest["target"]["engine_missing_reason"]
    return model


# In CI, the families that take each branch of the lowering (lowering.py): grouped-query
# attention, a packed QKV (phi3), no rotary and LayerNorm (gpt2), a window and a softcap
# (gemma2), partial rotary with LayerNorm (phi), ATen attention (falcon), interleaved rotary
# (cohere). The other seven take the same branches and run with `make test-heavy` (each build
# is 10 s of CI's 20 minutes).
CI_FAMILIES = ("llama", "phi3", "gpt2", "gemma2", "phi", "falcon", "cohere")


@pytest.mark.parametrize("arch", heavy_where(TINY_ARCHS, lambda a: a not in CI_FAMILIES))
def test_every_family_runs_with_pytorchs_greedy_tokens(arch, tiny_artifact, tiny_model):
    path = tiny_artifact(arch, target="tensorrt")
    model = check_network(path)
    ops = {n.op_type for n in model.graph.node}
    manifest = read_manifest(path)
    replaced = next(r for r in manifest["passes"] if r["name"] == "replace_attention")
    if replaced["counts"]["attention"]:  # falcon keeps its own attention, exported as ATen
        attention = [n for n in model.graph.node if n.op_type == "Attention"]
        assert len(attention) == manifest["model"]["num_layers"]
    ver = manifest["verification"]
    assert ver["passed"] and ver["max_abs_diff"] <= 1e-4 and ver["greedy_agreement"] == 18
    assert "RMSNormalization" in ops or "LayerNormalization" in ops
    torch_model, tokenizer = tiny_model(arch)
    ids = tokenizer(PROMPT)["input_ids"]
    gen = verify_generator(path)
    ours = [int(t[0]) for t in gen.generate_ids([ids], GenerationConfig(32, ignore_eos=True))]
    assert ours == hf_greedy(torch_model, ids, 32)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_network_dequantizes_blockwise_without_zero_points(quant, tiny_artifact):
    path = tiny_artifact("llama", target="tensorrt", quant=quant)
    model = check_network(path)
    manifest = read_manifest(path)
    assert manifest["quantization"]["symmetric"] is True  # TensorRT: zero points of 0 only
    ver = manifest["verification"]
    assert ver["passed"] and ver["reference"] == "pytorch-llmc-graph"
    assert ver["max_abs_diff"] <= 1e-4 and ver["greedy_agreement"] == 18
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == manifest["target"]["quantized_matmuls"] > 0
    bits = int(quant[3:])
    want = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
    for node in dq:
        assert len(node.input) == 2  # no zero point
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["block_size"] > 0
        lm_head = inits[node.input[0]].data_type == onnx.TensorProto.INT8 and bits == 4
        assert inits[node.input[0]].data_type == want or lm_head  # 8-bit lm_head and embedding


def test_parser_check_names_what_tensorrt_refuses():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    codes = helper.make_tensor("codes", TensorProto.INT8, [4, 4], [1] * 16)
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.5])
    zero = helper.make_tensor("zero", TensorProto.INT8, [], [3])
    nodes = [
        helper.make_node("DequantizeLinear", ["codes", "scale", "zero"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Hardmax", ["h"], ["g"]),
        helper.make_node("FastGelu", ["g"], ["y"], domain="com.microsoft"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], [codes, scale, zero])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    )
    problems = "\n".join(parser_support.check(model))
    assert "a zero point" in problems
    assert "Hardmax" in problems and "not in the table" in problems
    assert "domain com.microsoft" in problems
    assert "MatMul" not in problems


def test_cli_builds_the_network_and_run_refuses_with_advice(tmp_path):
    out = tmp_path / "trt"
    built = CliRunner().invoke(
        cli, ["build", "tiny:llama", "--target", "tensorrt", "--out", str(out)]
    )
    assert built.exit_code == 0, built.output
    assert "TensorRT >= 10.15" in built.output and "trtexec" in built.output
    ran = CliRunner().invoke(cli, ["run", str(out), "hello", "-n", "4"])
    assert ran.exit_code == 2
    assert "tensorrt" in ran.output and "NVIDIA" in ran.output
    assert not (out / engine.ENGINE_FILE).exists()


@pytest.mark.slow
@pytest.mark.heavy  # 90 s of CI's 20 minutes; the tiny families run in `make test`
def test_smollm2_network_keeps_128_greedy_tokens(tmp_path):
    """SmolLM2's network in onnxruntime: verified at build, and 128 greedy tokens of a chat
    prompt identical to transformers'."""

    from llmc.compiler import sources

    out = tmp_path / "smollm2-trt"
    built = CliRunner().invoke(cli, ["build", "--target", "tensorrt", "--out", str(out)])
    assert built.exit_code == 0, built.output
    check_network(out)
    manifest = read_manifest(out)
    ops = manifest["graph"]["op_histogram"]
    layers = manifest["model"]["num_layers"]
    assert ops["Attention"] == layers and ops["RotaryEmbedding"] == 2 * layers
    assert ops["RMSNormalization"] == 2 * layers + 1
    assert manifest["verification"]["max_abs_diff"] <= 1e-3
    reference = sources.load(sources.resolve(None))
    gen = verify_generator(out)
    messages = [{"role": "user", "content": "Explain why the sky is blue."}]
    ids = gen.encode(messages)
    ours = [int(t[0]) for t in gen.generate_ids([ids], GenerationConfig(128, ignore_eos=True))]
    assert ours == hf_greedy(reference.model, ids, 128)
    assert np.isfinite(manifest["verification"]["max_abs_diff"])
