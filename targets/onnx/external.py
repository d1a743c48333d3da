"""The external-data files an ONNX model names, checked before onnxruntime (or onnx) opens them:
each `location` must be a file inside the artifact directory. Read from the protobuf's wire
format with the schema's few fields that can hold a tensor, so the runtime needs no `onnx`."""

from __future__ import annotations

from pathlib import Path

from llmc.artifact_checks import artifact_file
from llmc.errors import ArtifactError

# The message fields (ONNX's onnx.proto numbers) that lead to a TensorProto: message -> {field:
# message it holds}. tests/test_hostile.py checks them against onnx's own descriptors.
SCHEMA: dict[str, dict[int, str]] = {
    "ModelProto": {7: "GraphProto", 20: "TrainingInfoProto", 25: "FunctionProto"},
    "GraphProto": {1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto"},
    "NodeProto": {5: "AttributeProto"},
    "AttributeProto": {
        5: "TensorProto",
        6: "GraphProto",
        10: "TensorProto",
        11: "GraphProto",
        22: "SparseTensorProto",
        23: "SparseTensorProto",
    },
    "SparseTensorProto": {1: "TensorProto", 2: "TensorProto"},
    "FunctionProto": {7: "NodeProto", 11: "AttributeProto"},
    "TrainingInfoProto": {1: "GraphProto", 2: "GraphProto"},
    "TensorProto": {13: "StringStringEntryProto"},  # external_data
    "StringStringEntryProto": {},
}
MAX_DEPTH = 64  # subgraphs nest (If, Loop); deeper than this is not a model llmc wrote


def check_external_data(model: Path, directory: Path) -> None:
    """ArtifactError unless every external-data location in `model` is a file in `directory`."""
    data = memoryview(model.read_bytes())  # the graph: kilobytes to megabytes (weights apart)
    try:
        locations = set(_locations(data, "ModelProto", 0))
    except (ValueError, IndexError, UnicodeDecodeError):
        raise ArtifactError(
            f"{model} is not a readable ONNX model; rebuild the artifact."
        ) from None
    for location in sorted(locations):
        artifact_file(directory, location, f"external data of {model.name}")


def _varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data):
    """(field number, payload) of each field of one message (payload: a view, or None)."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
            payload = None
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            payload = None
        elif wire == 2:
            size, pos = _varint(data, pos)
            payload = data[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("truncated")
        yield key >> 3, payload


def _locations(data, message: str, depth: int):
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    children = SCHEMA[message]
    if message == "TensorProto":
        for number, payload in _fields(data):
            if number == 13 and payload is not None:
                entry = {n: bytes(p).decode() for n, p in _fields(payload) if p is not None}
                if entry.get(1) == "location":
                    yield entry.get(2, "")
        return
    for number, payload in _fields(data):
        if number in children and payload is not None:
            yield from _locations(payload, children[number], depth + 1)
