"""Runtime contracts: no torch at import, artifact manifest and weights stored once."""

from __future__ import annotations

import subprocess
import sys

import onnx

import llmc.runtime as rt
from llmc.artifact import read_manifest


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
    assert m["io"]["kv_mode"] == "concat" and m["io"]["inputs"][:3] == [
        "input_ids",
        "position_ids",
        "attention_mask",
    ]
    assert m["io"]["past_inputs"][0] == "past_key_values.0.key"
    assert m["io"]["outputs"][:2] == ["logits", "present.0.key"]
    assert {"model.onnx", "model.onnx.data", "tokenizer.json"} <= set(m["files"])
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert (
        m["generation"]["eos_token_ids"] == [2]
        and "<|im_start|>" in m["generation"]["chat_template"]
    )
    assert {p["name"] for p in m["passes"]} == {
        "remove_assertions",
        "remove_noop_casts",
        "eliminate_dead_code",
    }


def test_tied_embedding_is_stored_once(tiny_artifact, tiny_model):
    model, _ = tiny_model("llama")
    assert model.config.tie_word_embeddings
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    onnx_model = onnx.load(str(tiny_artifact("llama") / "model.onnx"))
    big = [i for i in onnx_model.graph.initializer if len(i.dims) == 2 and i.dims[0] == 512]
    assert len(big) == 1  # the [vocab, hidden] matrix appears once
    total = sum(int(__import__("numpy").prod(i.dims)) for i in onnx_model.graph.initializer)
    assert total < sum(unique.values()) * 1.05


def test_generate_respects_max_new_tokens_and_context(tiny_artifact):
    gen = rt.load(tiny_artifact("llama", max_context=24))
    steps = list(gen.generate_ids([gen.encode("Hello")], rt.GenerationConfig(100, ignore_eos=True)))
    assert len(steps) == 24 - len(gen.encode("Hello"))  # stops at the context, no error
