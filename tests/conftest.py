"""Shared fixtures: tiny artifacts built once per test session."""

from __future__ import annotations

import pytest

# Fourteen families: attention, norm, RoPE and MLP variants (README, "Support matrix").
TINY_ARCHS = [
    *("llama", "qwen2", "mistral", "phi3", "gemma", "gpt2", "qwen3", "gemma2", "olmo2"),
    *("granite", "smollm3", "phi", "falcon", "cohere"),
]


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """Build (once) and return the artifact directory of tiny:ARCH."""
    built = {}

    def get(arch: str, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in built:
            from llmc.build import build
            from llmc.config import BuildConfig

            out = tmp_path_factory.mktemp(f"tiny-{arch}") / "artifact"
            built[key] = build(BuildConfig(model=f"tiny:{arch}", out=out, **overrides)).path
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_model():
    from llmc.compiler import tiny

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = (tiny.build_model(arch), tiny.build_tokenizer())
        return cache[arch]

    return get
