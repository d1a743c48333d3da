"""`llmc build --compat`: artifacts that OpenVINO GenAI and onnxruntime-genai load as they are.

The vendors' runtimes are the `vendors` extra (`make install` installs it); where one is absent
its tests are skipped with the reason, never faked. Each test runs the vendor's own runtime on a
tiny artifact and compares its greedy tokens with PyTorch eager's (transformers' generate)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from llmc.cli import cli
from llmc.compat import compare

PROMPT = "The capital of France is"
TOKENS = 24
RUNTIMES = {"openvino": "openvino-genai", "onnx": "onnxruntime-genai"}


def needs(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} is not installed (pip install 'llmc[vendors]')",
    )


def torch_greedy(tiny_model, arch: str, ids: list[int]) -> list[int]:
    import torch

    model, _ = tiny_model(arch)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS
        )
    return out[0, len(ids) :].tolist()


def prompt_ids(tiny_model, arch: str) -> list[int]:
    return tiny_model(arch)[1].encode(PROMPT)


def openvino_genai_greedy(directory, ids: list[int]) -> list[int]:
    import openvino as ov
    import openvino_genai

    # f32 inference: the plugin's default is bf16 on CPUs with AVX512-BF16 or AMX
    pipe = openvino_genai.LLMPipeline(str(directory), "CPU", INFERENCE_PRECISION_HINT="f32")
    config = pipe.get_generation_config()
    config.max_new_tokens, config.min_new_tokens, config.do_sample = TOKENS, TOKENS, False
    array = np.asarray([ids], np.int64)
    inputs = openvino_genai.TokenizedInputs(ov.Tensor(array), ov.Tensor(np.ones_like(array)))
    return [int(t) for t in pipe.generate(inputs, config).tokens[0]]


def onnxruntime_genai_greedy(directory, ids: list[int]) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    length = len(ids) + TOKENS
    params.set_search_options(do_sample=False, max_length=length, min_length=length)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@needs("openvino_genai")
def test_openvino_genai_runs_the_artifact_as_pytorch_does(arch, tiny_artifact, tiny_model):
    out = tiny_artifact(arch, target="openvino", compat="openvino-genai")
    ids = prompt_ids(tiny_model, arch)
    assert openvino_genai_greedy(out, ids) == torch_greedy(tiny_model, arch, ids)
    names = {p.name for p in out.iterdir()}
    assert {"openvino_tokenizer.xml", "openvino_detokenizer.xml"} <= names
    # LLMPipeline's own tokenizer IR, chat template and detokenizer on a text prompt
    import openvino_genai

    pipe = openvino_genai.LLMPipeline(str(out), "CPU", INFERENCE_PRECISION_HINT="f32")
    assert pipe.get_tokenizer().encode(PROMPT).input_ids.data[0].tolist() == ids
    assert isinstance(pipe.generate(PROMPT, max_new_tokens=4), str)
    manifest = json.loads((out / "llmc.json").read_text())
    record = manifest["runtimes"]["openvino-genai"]
    assert record["checked"] and record["identical"] and record["tokenizer_identical"]
    assert "logits_index" not in manifest["io"]["inputs"] and manifest["io"]["logits"] == "last"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@needs("onnxruntime_genai")
def test_onnxruntime_genai_runs_the_artifact_as_pytorch_does(arch, tiny_artifact, tiny_model):
    out = tiny_artifact(arch, target="onnx", compat="onnxruntime-genai")
    ids = prompt_ids(tiny_model, arch)
    assert onnxruntime_genai_greedy(out, ids) == torch_greedy(tiny_model, arch, ids)
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    manifest = json.loads((out / "llmc.json").read_text())
    inputs = manifest["io"]["inputs"]
    assert "attention_mask" in inputs and not {"seqlens_k", "logits_index"} & set(inputs)
    # GroupQueryAttention rotates inside for llama: position_ids goes; gpt2 reads it
    assert ("position_ids" in inputs) == (arch == "gpt2")
    assert ("position_ids" in config["model"]["decoder"]["inputs"]) == (arch == "gpt2")
    record = manifest["runtimes"]["onnxruntime-genai"]
    assert record["checked"] and record["identical"] and record["tokenizer_identical"]


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_llmc_runtime_loads_a_compat_artifact(target, tiny_artifact, tiny_model):
    """llmc's own runtime generates PyTorch's tokens from the compat graph (batched rows too),
    and refuses, in one sentence, what needs every position's logits."""
    from llmc import runtime as rt
    from llmc.errors import LlmcError, SessionError

    out = tiny_artifact("llama", target=target, compat=RUNTIMES[target])
    ids = prompt_ids(tiny_model, "llama")
    expected = torch_greedy(tiny_model, "llama", ids)
    gen = rt.load(out)
    seq = gen.model.sequence()
    logits = seq.prefill(np.array([ids, ids]))
    got = []
    for _ in range(TOKENS):
        token = logits.argmax(-1)
        got.append(int(token[0]))
        assert token[0] == token[1]
        logits = seq.decode(token[:, None])
    assert got == expected
    with pytest.raises(SessionError, match="last position only.*without --compat"):
        seq.extend(np.array([[1, 2], [1, 2]]))
    with pytest.raises(SessionError, match="last position only"):
        seq.score(np.array(ids))
    with pytest.raises(LlmcError, match="without --compat for speculative decoding"):
        gen.generate(PROMPT, max_new_tokens=4, draft="prompt-lookup")


@pytest.mark.heavy  # two int8 builds and vendor runs, 28 s of CI's 20 minutes: make test-heavy
@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_a_quantized_compat_artifact_loads_in_the_vendor_runtime(target, tiny_artifact):
    """int8 weights in the vendor's own form (MatMulNBits, compressed u8 constants) load and
    run; the fast kernels' tokens are recorded, not required to be PyTorch's."""
    module = {"onnx": "onnxruntime_genai", "openvino": "openvino_genai"}[target]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'llmc[vendors]')")
    out = tiny_artifact("llama", target=target, compat=RUNTIMES[target], quant="int8")
    record = json.loads((out / "llmc.json").read_text())["runtimes"][RUNTIMES[target]]
    assert record["checked"] and record["tokenizer_identical"]
    assert record["greedy_tokens"] > 0 and isinstance(record["identical"], bool)


@needs("onnxruntime_genai")
def test_llmc_verify_runs_the_vendor_runtime(tiny_artifact):
    out = tiny_artifact("llama", target="onnx", compat="onnxruntime-genai")
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    assert "onnxruntime-genai 0.18.0: 64 greedy tokens identical to PyTorch's" in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["tiny:llama", "-t", "openvino", "--compat", "onnxruntime-genai"],
         "--compat onnxruntime-genai is for --target onnx; with --target openvino use "
         "--compat openvino-genai."),
        (["tiny:llama", "-t", "tvm", "--compat", "openvino-genai"],
         "--compat applies to --target onnx or openvino, not tvm."),
        (["tiny:mamba", "-t", "onnx", "--compat", "onnxruntime-genai"],
         "--compat is not supported for mamba"),
    ],
)  # fmt: skip
def test_compat_flags_that_cannot_work_are_refused(args, fragment, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["build", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_greedy_tokens_are_compared_up_to_the_first_end_of_sequence():
    assert compare([5, 6, 7], [5, 6, 7], set()) is None
    assert compare([5, 6, 7], [5, 9, 7], set()) == 1
    assert compare([5, 6, 2, 8], [5, 6, 2], {2}) is None  # a runtime stops at EOS
    assert compare([5, 6, 2, 8], [5, 6], {2}) is None
    assert compare([5, 6, 7], [5, 6], {2}) == 2  # stopped early without an EOS
