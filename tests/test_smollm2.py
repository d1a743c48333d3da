"""End to end on the real SmolLM2-135M-Instruct: build with the CLI, answer, match transformers."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import llmc.runtime as rt
from llmc.cli import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-onnx"
    result = CliRunner().invoke(cli, ["build", "--target", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def reference():
    from llmc.compiler import sources

    return sources.load(sources.resolve(None))


def test_chat_answer_mentions_paris(smollm2):
    result = CliRunner().invoke(
        cli, ["run", str(smollm2), "--chat", "What is the capital of France?", "-n", "32"]
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout


def test_build_verified_within_design_tolerance(smollm2):
    ver = rt.load(smollm2).manifest["verification"]
    assert ver["passed"] and ver["max_abs_diff"] <= 1e-3
    assert ver["greedy_agreement"] == ver["steps_compared"] == 18


@pytest.mark.parametrize(
    "prompt",
    [
        "Write a long story about a lighthouse keeper.",
        "Explain why the sky is blue.",
    ],
)
def test_64_greedy_tokens_match_transformers(smollm2, reference, prompt):
    gen = rt.load(smollm2)
    messages = [{"role": "user", "content": prompt}]
    ids = gen.encode(messages)
    want_ids = reference.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    )
    assert ids == list(want_ids)
    ours = [int(t[0]) for t in gen.generate_ids([ids], rt.GenerationConfig(64, ignore_eos=True))]
    with torch.no_grad():
        out = reference.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=64,
            min_new_tokens=64,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=reference.tokenizer.pad_token_id,
        )
    assert ours == out[0, len(ids) :].tolist()
