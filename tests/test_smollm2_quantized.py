"""SmolLM2-135M quantized end to end (issue 4's acceptance): int8 and int4 artifacts built with
the CLI and `--eval`, their perplexity against fp32, and int8's greedy tokens against fp32."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import llmc.runtime as rt
from llmc.cli import cli

pytestmark = pytest.mark.slow
DATA = "../shared/data/tinyshakespeare-dev.txt"
PROMPT = "Write a long story about a lighthouse keeper."  # the benchmark prompt


def build(tmp_path_factory, quant: str):
    out = tmp_path_factory.mktemp(f"smollm2-{quant}") / "artifact"
    args = ["build", "--out", str(out), "--quant", quant, "--eval", DATA, "--eval-tokens", "1024"]
    result = CliRunner().invoke(cli, [*args, "--max-ppl-increase", "5%"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    return build(tmp_path_factory, "int8")


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    return build(tmp_path_factory, "int4")


@pytest.mark.heavy  # its build and evaluation take 3 minutes: `make test-heavy`, not CI
def test_int8_perplexity_within_1_percent_and_same_32_greedy_tokens(int8):
    """With the exact kernels, 32 greedy tokens equal fp32's. onnxruntime's fast decode kernels
    quantize activations to int8: even with the lm_head's top logits rescored exactly
    (rescore.py), the hidden states drift, and the text leaves fp32's between token 22 and 62 on
    this prompt, depending on one-step rounding ties of the build: recorded in the issue's note."""
    gen = rt.load(int8)
    m = gen.manifest
    assert m["evaluation"]["increase"] <= 0.01 and m["evaluation"]["tokens"] == 1023
    assert m["verification"]["passed"] and m["quantization"]["bits"] == 8
    ids = gen.encode(PROMPT, chat=True)
    config = rt.GenerationConfig(32, ignore_eos=True)
    fast = [int(t[0]) for t in gen.generate_ids([ids], config)]
    exact = rt.load(int8, exact=True)
    ours = [int(t[0]) for t in exact.generate_ids([ids], config)]
    from llmc.compiler import sources
    from tests.test_tiny_end_to_end import hf_greedy

    reference = sources.load(sources.resolve(None)).model
    assert ours == hf_greedy(reference, ids, 32)
    assert fast[:8] == ours[:8]


@pytest.mark.heavy  # 3.5 minutes of build, verification and perplexity: `make test-heavy`
def test_int4_keeps_the_q4_1_grid(int4):
    m = rt.load(int4).manifest
    assert m["evaluation"]["increase"] <= 0.05
    assert abs(m["evaluation"]["increase"]) < 1e-3  # the GGUF's own grid: nothing lost
    split = next(p for p in m["passes"] if p["name"] == "split_zero_points")
    assert split["counts"]["split"] == 150  # every projection; the lm_head is 8-bit
    ops = m["graph"]["op_histogram"]
    assert ops["com.microsoft::MatMulNBits"] == 151
    gen = rt.load(int4)
    answer = gen.generate("What is the capital of France?", chat=True, max_new_tokens=24)
    assert "Paris" in answer
