"""Shared fixtures: tiny artifacts built once per test session."""

from __future__ import annotations

import fcntl
import hashlib
import os

import pytest

# Tests build afresh: a stage-cache hit would skip the stages they exercise (tests/test_trust.py
# turns the cache on where it is the subject).
os.environ["LLMC_NO_CACHE"] = "1"

# Fourteen families: attention, norm, RoPE and MLP variants (README, "Support matrix").
TINY_ARCHS = [
    *("llama", "qwen2", "mistral", "phi3", "gemma", "gpt2", "qwen3", "gemma2", "olmo2"),
    *("granite", "smollm3", "phi", "falcon", "cohere"),
]


def heavy_where(values, heavy) -> list:
    """`values` as test parameters, those where `heavy(value)` holds marked heavy: they run with
    `make test-heavy`, not in CI."""
    return [pytest.param(v, marks=pytest.mark.heavy) if heavy(v) else v for v in values]


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """Build (once per test run, whichever xdist worker asks first; the other waits for it)
    and return the artifact directory of tiny:ARCH. Tests copy an artifact before changing it."""
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the run's own
    cache = shared / "tiny-artifacts"
    cache.mkdir(exist_ok=True)

    def get(arch: str, **overrides):
        if overrides.get("target") == "inductor":
            # Inductor's kernel choice changes no behaviour the tests check, and autotuning
            # costs a tiny build 50 s (bench/bench_decode.py checks the autotuned SmolLM2)
            overrides.setdefault("autotune", False)
        key = repr((arch, sorted(overrides.items())))
        out = cache / f"{arch}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        with open(f"{out}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (out / "llmc.json").is_file():
                from llmc.build import build
                from llmc.config import BuildConfig

                build(BuildConfig(model=f"tiny:{arch}", out=out, **overrides))
        return out

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


def pytest_collection_modifyitems(config, items):
    """The end-to-end SmolLM2 tests first (stable otherwise): the two xdist workers start on the
    longest work and fill in with short tests, instead of one of them finishing a long test
    alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
