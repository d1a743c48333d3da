"""Sources other than tiny:ARCH, the scoring graph, and the inspect / verify / targets commands."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

import llmc.runtime as rt
from llmc.cli import cli
from llmc.compiler import sources
from llmc.compiler.spec import ModelSpec
from llmc.compiler.trace import example_inputs, trace


def test_hf_directory_source_builds_and_generates(tmp_path, tiny_model):
    model, tokenizer = tiny_model("qwen2")
    model_dir = tmp_path / "qwen2-dir"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "artifact"
    result = CliRunner().invoke(cli, ["build", str(model_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "llmc.json").read_text())
    assert manifest["source"]["kind"] == "hf-dir" and manifest["verification"]["passed"]
    gen = rt.load(out)
    ids = gen.encode("Hello there")
    ours = [int(t[0]) for t in gen.generate_ids([ids], rt.GenerationConfig(8, ignore_eos=True))]
    want = model.generate(
        torch.tensor([ids]),
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert ours == want[0, len(ids) :].tolist()


def test_resolve_kinds(tmp_path):
    assert sources.resolve(None).kind == "default"
    assert sources.resolve(str(sources.default_gguf_path())).kind == "gguf"
    assert sources.resolve("tiny:gemma").name == "tiny-gemma"
    assert sources.resolve("HuggingFaceTB/SmolLM2-135M").kind == "hub"


def test_scoring_graph_returns_logits_for_every_position(tiny_model):
    model, _ = tiny_model("llama")
    spec = ModelSpec.from_config(model.config)
    program = trace(model, spec).program  # no logits_index input: every position
    ids, pos, mask, *past = example_inputs(spec, batch=1, seq=5, past=0)
    logits = program.module()(ids, pos, mask, *past)[0]
    with torch.no_grad():
        want = model(ids).logits
    assert logits.shape == (1, 5, spec.vocab_size)
    assert (logits - want).abs().max().item() <= 1e-5


def test_inspect_verify_and_targets_commands(tiny_artifact):
    path = str(tiny_artifact("llama"))
    runner = CliRunner()
    shown = runner.invoke(cli, ["inspect", path])
    assert shown.exit_code == 0, shown.output
    for text in ("remove_noop_casts", "verified passed", "model.onnx.data", "MatMul"):
        assert text in shown.stdout, text
    as_json = json.loads(runner.invoke(cli, ["inspect", path, "--json"]).stdout)
    assert as_json["target"]["name"] == "onnx"
    checked = runner.invoke(cli, ["verify", path])
    assert checked.exit_code == 0 and "greedy agreement 18/18" in checked.stdout
    listed = runner.invoke(cli, ["targets"]).stdout
    assert "onnx" in listed and "ready" in listed and "[runtime: onnxruntime]" in listed
    assert "builds; runs where tensorrt is" in listed  # the network is built here, not run


def test_newer_toolchain_is_refused(tiny_artifact, tmp_path):
    import shutil

    from llmc.artifact import write_manifest

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact("llama"), copy)
    manifest = json.loads((copy / "llmc.json").read_text())
    manifest["toolchain"]["onnxruntime"] = "99.0.0"
    write_manifest(copy, manifest)
    result = CliRunner().invoke(cli, ["run", str(copy), "Hi"])
    assert result.exit_code == 2 and "upgrade it with" in result.stderr
