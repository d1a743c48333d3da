"""Runtime contracts: no torch at import, artifact manifest and weights stored once."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import onnx

import llmc.runtime as rt
from llmc.artifact import read_manifest
from llmc.targets.onnx.pipeline import pipeline


def test_runtime_does_not_import_torch(tiny_artifact):
    path = tiny_artifact("llama")
    code = (
        "import sys, llmc.runtime as rt\n"
        f"g = rt.load({str(path)!r})\n"
        "g.generate('Hello', max_new_tokens=4)\n"
        "bad = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_manifest_records_the_design_fields(tiny_artifact):
    m = read_manifest(tiny_artifact("qwen2"))
    for key in (
        "format_version",
        "llmc_version",
        "toolchain",
        "source",
        "model",
        "target",
        "io",
        "quantization",
        "passes",
        "verification",
        "files",
        "generation",
        "graph",
    ):
        assert key in m, key
    assert m["source"]["kind"] == "tiny" and len(m["source"]["weights_sha256"]) == 64
    assert m["io"]["kv_mode"] == "shared" and m["io"]["inputs"][0] == "input_ids"
    assert "seqlens_k" in m["io"]["inputs"] and m["io"]["logits"] == "selected"
    assert m["io"]["past_inputs"][0] == "past_key_values.0.key"
    assert m["io"]["outputs"][:2] == ["logits", "present.0.key"]
    assert {"model.onnx", "model.onnx.data", "tokenizer.json"} <= set(m["files"])
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert (
        m["generation"]["eos_token_ids"] == [2]
        and "<|im_start|>" in m["generation"]["chat_template"]
    )
    assert [p["name"] for p in m["passes"]] == [p.name for p in pipeline()]
    assert m["graph"]["op_histogram"]["com.microsoft::GroupQueryAttention"] == 2


def test_tied_embedding_is_stored_once(tiny_artifact, tiny_model):
    model, _ = tiny_model("llama")
    assert model.config.tie_word_embeddings
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    onnx_model = onnx.load(str(tiny_artifact("llama") / "model.onnx"))
    big = [i for i in onnx_model.graph.initializer if list(i.dims) == [512, 64]]
    assert len(big) == 1  # the [vocab, hidden] matrix appears once
    weights = [i for i in onnx_model.graph.initializer if not i.name.startswith("rotary_")]
    total = sum(int(np.prod(i.dims)) for i in weights)  # the cos/sin tables are not weights
    assert total < sum(unique.values()) * 1.05


def test_generate_respects_max_new_tokens_and_context(tiny_artifact):
    gen = rt.load(tiny_artifact("llama", max_context=24))
    steps = list(gen.generate_ids([gen.encode("Hello")], rt.GenerationConfig(100, ignore_eos=True)))
    assert len(steps) == 24 - len(gen.encode("Hello"))  # stops at the context, no error


def test_shared_kv_decode_reuses_its_buffers_and_binding(tiny_artifact):
    gen = rt.load(tiny_artifact("llama"))
    session = gen.model.sequence()
    session.prefill(np.array([gen.encode("Hello, world")]))
    session.decode(np.array([[5]]))
    binding, buffer = session._decoders[1].binding, session._buffers[0].ctypes.data
    for token in range(6, 12):
        session.decode(np.array([[token]]))
    # in place: the same buffers and the same binding at every step, nothing reallocated
    assert session._decoders[1].binding is binding and session._buffers[0].ctypes.data == buffer


def test_shared_kv_grows_past_its_first_capacity_like_concat(tiny_artifact):
    shared = rt.load(tiny_artifact("llama"))
    concat = rt.load(tiny_artifact("llama", passes="-rewire_kv_cache"))
    assert concat.manifest["io"]["kv_mode"] == "concat"
    assert "com.microsoft::GroupQueryAttention" not in concat.manifest["graph"]["op_histogram"]
    prompt = [shared.encode("Once upon a time")]
    config = rt.GenerationConfig(300, ignore_eos=True)
    a = np.concatenate(list(shared.generate_ids(prompt, config)))
    with shared.sequence() as seq:  # the pooled sequence that ran it
        assert seq.capacity == 512  # 256 first, grown once
    b = np.concatenate(list(concat.generate_ids(prompt, config)))
    assert len(a) == len(b) == 300
    assert np.array_equal(a, b)  # same tokens through the buffer growth


def _anon_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages"))


def test_huge_pages_keep_contents_and_are_used_where_linux_allows():
    from pathlib import Path

    from llmc.runtime.memory import use_huge_pages

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    weights = np.random.default_rng(0).standard_normal(16 << 20).astype(np.float32)  # 64 MiB
    before, copy = _anon_huge_kb(), weights.copy()
    done = use_huge_pages()
    assert np.array_equal(weights, copy)  # same memory, same contents
    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    collapses = release >= (6, 1)  # MADV_COLLAPSE arrived in Linux 6.1
    if collapses and thp.exists() and "[never]" not in thp.read_text():
        assert done >= 32 and _anon_huge_kb() - before >= 32 << 10
    else:
        assert done == 0


def test_step_feeds_extend_the_tracked_mask():
    from llmc.runtime.padded import PositionTracker
    from llmc.targets.base import step_feeds

    tracker = PositionTracker(16)
    first = step_feeds(tracker, [[0, 5, 6]], np.array([[0, 1, 1]]))  # left-padded prompt
    assert first["input_ids"].dtype == np.int64 and first["logits_index"].tolist() == [2]
    assert first["position_ids"].tolist() == [[1, 0, 1]]
    step = step_feeds(tracker, [[7]], None)
    assert step["attention_mask"].tolist() == [[0, 1, 1, 1]]
    assert step["position_ids"].tolist() == [[2]] and step["position_ids"].flags.c_contiguous
    every = step_feeds(PositionTracker(16), [[1, 2]], None, all_positions=True)
    assert every["logits_index"].tolist() == [0, 1]
