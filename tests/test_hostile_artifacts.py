"""Hostile artifacts: a manifest that is not one, paths that lead out of the artifact, ONNX
external data elsewhere, native code that does not match its checksum. Each is one
ArtifactError sentence, raised before anything outside the directory is read or loaded."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import llmc.runtime as rt
from llmc.artifact import read_manifest, write_manifest
from llmc.errors import ArtifactError
from tests.test_hostile import assert_sentence


@pytest.fixture
def copy(tiny_artifact, tmp_path):
    """A copy of tiny:llama (ONNX) with a secret file beside it."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret")
    out = tmp_path / "artifact"
    shutil.copytree(tiny_artifact("llama"), out)
    return out


def refused(directory, *fragments, check=True):
    with pytest.raises(ArtifactError) as info:
        rt.load(directory, check=check)
    assert_sentence(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


def edit_manifest(directory, change, rehash=False):
    manifest = json.loads((directory / "llmc.json").read_text())
    change(manifest)
    if rehash:  # a consistent artifact: the checksums describe the files as they are now
        write_manifest(directory, {k: v for k, v in manifest.items() if k != "files"})
    else:
        (directory / "llmc.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (b"", "not valid JSON"),
        (b'{"format_version": 1, "files": {', "not valid JSON"),  # truncated
        (b"\xff\xfe{}", "not valid JSON"),  # not UTF-8
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nested past the recursion limit
        (b'{"format_version": ' + b"9" * 5000 + b"}", "not valid JSON"),  # a number too long
        (b"[]", "format unknown"),
        (b'"llmc"', "format unknown"),
        (b'{"format_version": 2}', "format 2"),
        (b'{"format_version": "1"}', "format unknown"),
        (b'{"format_version": true}', "format unknown"),
        (b'{"format_version": null}', "format unknown"),
        (b'{"format_version": 1}', "'target' is missing"),
        (b'{"format_version": 1, "files": []}', "'files' is not an object"),
    ],
)
def test_a_manifest_that_is_not_one(copy, text, fragment):
    (copy / "llmc.json").write_bytes(text)
    with pytest.raises(ArtifactError) as info:
        read_manifest(copy)
    assert_sentence(info.value)
    assert fragment in str(info.value)


def test_a_manifest_that_is_a_link_out_of_the_artifact(copy):
    (copy / "llmc.json").unlink()
    (copy / "llmc.json").symlink_to(copy.parent / "outside" / "secret")
    refused(copy, "outside the artifact")


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("../outside/secret", "outside the artifact"),
        ("sub/../../outside/secret", "outside the artifact"),
        ("{outside}/secret", "not a relative path"),  # absolute
        ("link", "outside the artifact"),  # a symbolic link inside that leads out
        ("", "not a relative path"),
    ],
)
def test_a_files_table_that_names_a_path_outside(copy, name, fragment, check):
    name = name.format(outside=copy.parent / "outside")
    (copy / "link").symlink_to(copy.parent / "outside" / "secret")
    edit_manifest(copy, lambda m: m["files"].update({name: {"size": 6, "sha256": "0" * 64}}))
    refused(copy, fragment, check=check)


@pytest.mark.parametrize("name", ["../outside/secret", "/etc/passwd", "link"])
def test_a_model_file_outside_the_artifact(copy, name):
    (copy / "link").symlink_to(copy.parent / "outside" / "secret")
    edit_manifest(copy, lambda m: m["target"]["files"].update(model=name))
    refused(copy, f"target file 'model' {name!r}", check=False)


def test_a_tokenizer_that_is_a_link_out_of_the_artifact(copy):
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(copy.parent / "outside" / "secret")
    edit_manifest(copy, lambda m: m["files"].pop("tokenizer.json"))
    refused(copy, "tokenizer.json", "outside the artifact", check=False)


def test_a_model_file_that_is_a_pipe_is_refused_not_read(copy):
    """A read of a FIFO would wait forever for a writer."""
    (copy / "model.onnx").unlink()
    os.mkfifo(copy / "model.onnx")
    refused(copy, "missing model.onnx", check=False)
    refused(copy, "missing model.onnx")


@pytest.mark.parametrize("location", ["../outside/secret.data", "{outside}/secret.data", "link"])
def test_onnx_external_data_outside_the_artifact_is_refused_before_onnxruntime(
    copy, location, monkeypatch
):
    """A consistent artifact (its checksums rewritten) whose model.onnx names weights elsewhere:
    refused by llmc before onnxruntime opens anything (its own check is the second line)."""
    import onnx
    import onnxruntime

    outside = copy.parent / "outside"
    shutil.copy(copy / "model.onnx.data", outside / "secret.data")
    location = location.format(outside=outside)
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(copy / "model.onnx"))
    edit_manifest(copy, lambda m: None, rehash=True)
    (copy / "link").symlink_to(outside / "secret.data")  # not in the files table

    def no_session(*args, **kwargs):
        raise AssertionError("onnxruntime was asked to load the model")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    refused(copy, f"external data of model.onnx {location!r}")


def test_the_external_data_reader_knows_every_field_that_holds_a_tensor():
    """targets/onnx/external.py walks ONNX's wire format with a table of field numbers: the
    fields, per message, that lead to a TensorProto, as onnx's own descriptors say."""
    import onnx

    from llmc.targets.onnx.external import SCHEMA

    def reaches(d, seen=()):
        if d.name == "TensorProto":
            return True
        return d.full_name not in seen and any(
            f.message_type and reaches(f.message_type, (*seen, d.full_name)) for f in d.fields
        )

    derived, todo = {}, [onnx.ModelProto.DESCRIPTOR]
    while todo:
        d = todo.pop()
        if d.name in derived:
            continue
        keep = [f for f in d.fields if f.message_type and reaches(f.message_type)]
        if d.name == "TensorProto":
            keep = [d.fields_by_name["external_data"]]
        derived[d.name] = {f.number: f.message_type.name for f in keep}
        todo += [f.message_type for f in keep]
    assert {k: v for k, v in derived.items() if v} == {k: v for k, v in SCHEMA.items() if v}


def test_a_truncated_onnx_model_is_an_artifact_error(copy):
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])
    refused(copy, "model.onnx", check=False)


# -- native code ------------------------------------------------------------------------------
@pytest.fixture
def tvm_copy(tiny_artifact, tmp_path):
    pytest.importorskip("tvm")
    out = tmp_path / "tvm"
    shutil.copytree(tiny_artifact("llama", target="tvm"), out)
    return out


def test_a_tvm_library_that_does_not_match_its_checksum_is_not_loaded(tvm_copy, monkeypatch):
    import tvm

    loaded = []
    real = tvm.runtime.load_module
    monkeypatch.setattr(tvm.runtime, "load_module", lambda path: loaded.append(path) or real(path))
    library = tvm_copy / read_manifest(tvm_copy)["target"]["library"]
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    library.write_bytes(bytes(data))
    refused(tvm_copy, f"{library.name} does not match its checksum")
    message = refused(tvm_copy, f"{library.name} (its TVM library, native code)", check=False)
    assert "refusing to load it" in message
    edit_manifest(tvm_copy, lambda m: m["files"].pop(library.name))
    refused(tvm_copy, "has no checksum in the manifest", check=False)
    assert loaded == []


def test_an_aotinductor_package_is_loaded_only_with_its_checksum(copy, monkeypatch):
    """A fake package (the session's check runs before torch opens it, so no build is needed)."""
    inductor = pytest.importorskip("torch._inductor")
    from llmc.targets.inductor.session import Model

    opened = []
    monkeypatch.setattr(inductor, "aoti_load_package", lambda p: opened.append(p) or 0)
    (copy / "model.pt2").write_bytes(b"PK not really a package")
    target = {"name": "inductor", "files": {"model": "model.pt2"}, "inputs": [], "device": "cpu"}
    edit_manifest(copy, lambda m: m.update(target=target), rehash=True)
    Model(copy, read_manifest(copy))  # the checksum matches: torch is asked to load it
    assert len(opened) == 1
    (copy / "model.pt2").write_bytes(b"PK not really a packagE")
    with pytest.raises(ArtifactError, match="model.pt2 .its AOTInductor package, native code"):
        Model(copy, read_manifest(copy, check_files=False))
    assert len(opened) == 1


# -- the command line -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "value", "fragment"),
    [("passes", "x", "llmc.json"), ("graph", {}, "llmc.json"), ("verification", {}, "llmc.json"),
     ("source", [], "llmc.json"), ("build", None, "llmc.json"),
     ("target", {"name": "onnx", "files": {"model": "../x"}}, "outside the artifact"),
     ("generation", {"pad_token_id": -1}, "llmc.json")],
)  # fmt: skip
def test_inspect_and_run_of_a_malformed_manifest_are_exit_2(copy, section, value, fragment):
    from tests.test_cli_errors import assert_user_error, invoke

    edit_manifest(copy, lambda m: m.update({section: value}))
    assert_user_error(invoke("inspect", copy), fragment)
    if section in ("target", "generation"):
        assert_user_error(invoke("run", copy, "Hello", "--max-new-tokens", "2"), fragment)


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [("--temperature", "nan", "temperature must be a finite number"),
     ("--seed", "-1", "seed must be >= 0"),
     ("--top-p", "inf", "not in the range"),  # click's own range check: exit 2 as well
     ("--max-new-tokens", "0", "not in the range")],
)  # fmt: skip
def test_run_with_a_value_out_of_range_is_exit_2(tiny_artifact, flag, value, fragment):
    from tests.test_cli_errors import invoke

    result = invoke("run", tiny_artifact("llama"), "Hello", flag, value)
    assert result.exit_code == 2 and fragment in result.output, result.output
