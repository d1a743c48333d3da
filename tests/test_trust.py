"""Trustworthy builds: reproducible bytes for every ready target (built through `llmc build
--json`, the command CI users run), the stage cache, and multi-target builds cross-checked."""

from __future__ import annotations

import json
import os
import time

import pytest
from click.testing import CliRunner

from llmc.artifact import file_table, read_manifest
from llmc.build import stage_cache
from llmc.cache import StageCache
from llmc.cli import cli
from llmc.config import BuildConfig
from llmc.targets import TARGETS
from tests.conftest import heavy_where

READY = [t.name for t in TARGETS.values() if t.ready and not t.missing()]
# AOTInductor compiles C++ twice here (44 s of CI's 20 minutes): `make test-heavy`
BUILDS = heavy_where(READY, lambda t: t == "inductor")


def llmc_build(*args: str, env: dict | None = None):
    """`llmc build ... --json` in this process; (exit code, parsed JSON or None, stderr)."""
    result = CliRunner().invoke(cli, ["build", *args, "--json"], env=env)
    try:
        data = json.loads(result.stdout)
    except ValueError:
        data = None
    return result.exit_code, data, result.stderr


@pytest.mark.parametrize("target", BUILDS)
def test_the_same_build_gives_the_same_bytes(target, tiny_artifact, tmp_path):
    """A second build of tiny:llama (in another process or, as here, the same one: OpenVINO's
    node counters, TVM's shape functions and Inductor's package ids once differed) gives the
    same sha256 for every file and the same content digest; only the `build` field differs."""
    flags = {"autotune": False} if target == "inductor" else {}
    first = tiny_artifact("llama", target=target, **flags)
    extra = ["--no-autotune"] if target == "inductor" else []
    out = tmp_path / target
    code, data, err = llmc_build("tiny:llama", "--target", target, "--out", str(out), *extra)
    assert code == 0, err
    (result,) = data["artifacts"]
    assert result["verification"]["passed"] and result["tokenizer"] is True
    assert result["files"] == {k: v["size"] for k, v in file_table(out).items()}
    assert file_table(out) == file_table(first)
    again, before = read_manifest(out), read_manifest(first)
    assert again["content_sha256"] == before["content_sha256"] == result["content_sha256"]
    assert again["build"]["created"] and again["build"]["cache"]["hit"] is False


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMC_NO_CACHE", raising=False)
    return tmp_path / "cache"


def test_a_second_build_is_reused_from_the_cache(cache_dir, tmp_path):
    args = ["tiny:llama", "--quant", "int4", "--out", str(tmp_path / "a")]
    code, cold, err = llmc_build(*args)
    assert code == 0, err
    assert cold["artifacts"][0]["cache"]["hit"] is False
    code, warm, err = llmc_build(*args)
    assert code == 0, err
    assert "cache hit" in err and "--no-cache rebuilds" in err
    (cold_result,), (warm_result,) = cold["artifacts"], warm["artifacts"]
    assert warm_result["cache"]["hit"] is True
    assert warm_result["cache"]["key"] == cold_result["cache"]["key"]
    assert warm_result["content_sha256"] == cold_result["content_sha256"]
    read_manifest(tmp_path / "a")  # every checksum holds
    kinds = {e["kind"] for e in StageCache().entries()}
    assert kinds == {"artifacts", "trace", "quant"}

    # other options: the artifact is built again from the cached trace and quantized weights
    code, other, err = llmc_build(*args[:3], "--passes", "-eliminate_dead_code", "--out",
                                  str(tmp_path / "b"))  # fmt: skip
    assert code == 0, err
    assert other["artifacts"][0]["cache"]["hit"] is False
    assert "trace reused from the stage cache" in err
    manifest = read_manifest(tmp_path / "b")
    report = next(p for p in manifest["passes"] if p["name"] == "quantize_weights")
    reused = manifest["build"]["cache"]["reused"]
    assert reused == {"trace": 1, "quantized_weights": report["counts"]["quantized"] + 1}

    # a corrupted entry is dropped, not reused; --no-cache (LLMC_NO_CACHE=1) uses no cache
    entry = StageCache().root / "artifacts" / cold_result["cache"]["key"]
    victim = next(p for p in sorted(entry.iterdir()) if p.suffix in (".onnx", ".data"))
    victim.write_bytes(b"\0" + victim.read_bytes()[1:])
    assert StageCache().artifact(cold_result["cache"]["key"]) is None and not entry.exists()
    assert stage_cache(BuildConfig(cache=False)) is None
    assert stage_cache(BuildConfig(dump_after=("fuse_rms_norm",))) is None

    result = CliRunner().invoke(cli, ["cache", "list"])
    assert result.exit_code == 0 and "artifacts" in result.stdout and "entries" in result.stdout
    result = CliRunner().invoke(cli, ["cache", "clear"])
    assert result.exit_code == 0 and StageCache().entries() == []


def test_the_cache_evicts_the_least_recently_used(cache_dir):
    stages = StageCache()
    for i, key in enumerate(("old", "middle", "new")):
        entry = stages.root / "artifacts" / key
        entry.mkdir(parents=True)
        (entry / "weights.bin").write_bytes(b"x" * 1000)
        (entry / ".last_used").touch()
        os.utime(entry / ".last_used", (time.time() - 100 + i, time.time() - 100 + i))
    assert [e["key"] for e in stages.entries()] == ["new", "middle", "old"]
    dropped = stages.evict(limit=2500)
    assert [e["key"] for e in dropped] == ["old"]
    assert [e["key"] for e in stages.entries()] == ["new", "middle"]


def test_several_targets_from_one_build_are_cross_checked(tmp_path):
    out = tmp_path / "multi"
    code, data, err = llmc_build(
        "tiny:llama", "--target", "onnx,openvino", "--quant", "int4", "--out", str(out)
    )
    assert code == 0, err
    record = data["cross_check"]
    assert record["passed"] and record["same_weights"] is True
    assert record["targets"] == ["onnx", "openvino"]
    (pair,) = record["pairs"]
    assert pair["greedy_agreement"] == pair["steps_compared"] > 0
    assert pair["max_abs_diff"] <= record["tolerance"]
    digests = set(record["weights_sha256"].values())
    for target in ("onnx", "openvino"):
        manifest = read_manifest(out / target)  # the cross-check changed no checksum
        assert manifest["cross_check"] == record
        assert {manifest["quantization"]["weights_sha256"]} == digests
    assert [a["path"] for a in data["artifacts"]] == [str(out / "onnx"), str(out / "openvino")]


@pytest.mark.parametrize("targets", ["onnx,onnx", "onnx,", "onnx,bogus"])
def test_bad_target_lists_are_refused_before_building(targets, tmp_path):
    code, data, err = llmc_build("tiny:llama", "--target", targets, "--out", str(tmp_path / "x"))
    assert code == 2 and data is None
    assert "error:" in err and not (tmp_path / "x").exists()
