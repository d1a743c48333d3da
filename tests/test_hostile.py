"""Hostile input, property-based (hypothesis, bounded): whatever a caller passes to the runtime
API and whatever an artifact's llmc.json holds, the answer is text or one LlmcError sentence,
never another exception, a hang or a read outside the artifact."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import llmc.runtime as rt
from llmc.errors import LlmcError

BOUNDED = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI never meets a new one by chance
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_sentence(exc: LlmcError) -> None:
    """One actionable sentence: a line that ends with a full stop."""
    text = str(exc)
    assert text and "\n" not in text and text.endswith("."), repr(text)
    assert len(text) < 600, text


def refusal(exc: LlmcError) -> None:
    """assert_sentence in a hypothesis test, counted in its statistics by error class."""
    assert_sentence(exc)
    event(type(exc).__name__)


@pytest.fixture(scope="module")
def gen(tiny_artifact):
    return rt.load(tiny_artifact("llama"))


# -- the runtime API --------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
anything = scalars | st.binary(max_size=4)
token_ids = st.lists(st.integers(-(2**70), 2**70) | st.integers(0, 600), max_size=8)
message = st.dictionaries(
    st.sampled_from(["role", "content", "tool_calls", "name"]),
    st.sampled_from(["user", "assistant", "system", ""])
    | anything
    | st.lists(anything, max_size=2),
    max_size=3,
)
prompts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="ab ", min_size=2000, max_size=4000),  # past the 512-token context
    st.sampled_from(["ab " * 10**5, "x" * 10**6]),  # megabytes: refused on a prefix
    token_ids,
    st.lists(st.integers(0, 511), min_size=511, max_size=600),  # at or past the context
    st.lists(message, max_size=3),
    st.lists(anything, max_size=3),
    anything,
    st.builds(np.array, st.lists(st.integers(0, 600), max_size=4)),
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 2),
    st.floats(1e-300, 1e-6),  # temperatures and penalties that overflow a logit
    st.integers(-3, 60),
    st.text(max_size=3),
    st.none(),
    st.booleans(),
)
options = st.fixed_dictionaries(
    {},
    optional={
        "temperature": numbers,
        "top_k": numbers,
        "top_p": numbers,
        "repetition_penalty": numbers,
        "seed": st.integers(-3, 2**70) | numbers,
        "max_new_tokens": st.integers(-2, 3) | st.floats() | st.text(max_size=2) | st.none(),
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3) | anything, max_size=2),
        "ignore_eos": st.booleans(),
        "chat": st.booleans(),
        "draft": st.sampled_from(["prompt-lookup", "nope"]) | anything,
        "num_draft": st.integers(-1, 20) | anything,
        "no_such_option": anything,
    },
)


def _generate(gen, call, prompt, kwargs):
    kwargs = {"max_new_tokens": 2, **kwargs}
    try:
        out = call(prompt, **kwargs)
    except LlmcError as exc:
        refusal(exc)
        return None
    return out


@BOUNDED
@given(prompt=prompts, kwargs=options)
def test_generate_answers_text_or_one_llmc_error(gen, prompt, kwargs):
    out = _generate(gen, gen.generate, prompt, kwargs)
    assert out is None or isinstance(out, str)


@settings(BOUNDED, max_examples=40)
@given(batch=st.one_of(st.lists(prompts, max_size=3), anything), kwargs=options)
def test_generate_batch_answers_texts_or_one_llmc_error(gen, batch, kwargs):
    out = _generate(gen, gen.generate_batch, batch, kwargs)
    assert out is None or (isinstance(out, list) and all(isinstance(t, str) for t in out))


rows = st.lists(st.lists(st.integers(-5, 600), min_size=1, max_size=3), min_size=1, max_size=2)
arrays = st.one_of(
    rows,  # as lists: ragged ones too
    rows.filter(lambda r: len({len(x) for x in r}) == 1).map(np.array),
    st.builds(np.array, st.lists(st.floats(allow_nan=True), max_size=3)),
    st.builds(lambda n: np.full((1, 2), n, np.uint64), st.integers(0, 2**64 - 1)),
    st.builds(lambda s: np.zeros(s, np.int64), st.lists(st.integers(0, 3), max_size=4)),
    anything,
)


@settings(BOUNDED, max_examples=40)
@given(ids=arrays, mask=st.none() | arrays, then=arrays)
def test_a_sequence_refuses_bad_ids_with_a_session_error(gen, ids, mask, then):
    """The layer below the generator: prefill, decode, extend and score check what they get."""
    with gen.sequence() as seq:
        for call, args in ((seq.prefill, (ids, mask)), (seq.decode, (then,)), (seq.score, (ids,))):
            try:
                call(*args)
            except LlmcError as exc:
                refusal(exc)


def test_the_sampling_of_a_tiny_temperature_is_greedy(gen):
    """1e-300 overflows every logit it divides: the shifted logits keep a distribution."""
    greedy = gen.generate([5, 6, 7], max_new_tokens=4)
    assert gen.generate([5, 6, 7], max_new_tokens=4, temperature=1e-300, seed=0) == greedy


# -- llmc.json --------------------------------------------------------------------------------
KEYS = [
    ["format_version"], ["files"], ["files", "model.onnx"], ["files", "model.onnx", "size"],
    ["files", "model.onnx", "sha256"], ["files", "tokenizer.json", "sha256"], ["target"],
    ["target", "name"], ["target", "files"], ["target", "files", "model"], ["model"],
    ["model", "vocab_size"], ["model", "num_layers"], ["io"], ["io", "max_context"],
    ["io", "kv_mode"], ["io", "kv_dtype"], ["io", "logits"], ["io", "kv_geometry"],
    ["io", "kv_geometry", "layers"], ["io", "kv_geometry", "head_dim"], ["generation"],
    ["generation", "eos_token_ids"], ["generation", "pad_token_id"], ["generation", "bos_token_id"],
    ["generation", "chat_template"], ["generation", "special_tokens"], ["toolchain"],
    ["toolchain", "onnxruntime"], ["quantization"],
]  # fmt: skip
HOSTILE_PATHS = [
    "../outside/secret",
    "/etc/passwd",
    "escape",
    "",
    ".",
    "..",
    "a\0b",
    "tokenizer.json",
]
json_values = st.recursive(
    scalars | st.sampled_from(HOSTILE_PATHS),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
mutations = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), json_values),
    st.tuples(st.just("delete"), st.sampled_from(KEYS), st.none()),
    st.tuples(st.just("truncate"), st.integers(0, 4000), st.none()),
    st.tuples(st.just("file"), st.sampled_from(HOSTILE_PATHS) | st.text(max_size=12), st.none()),
    st.tuples(st.just("bytes"), st.binary(max_size=64), st.none()),
)


def _mutate(text: str, kind: str, where, value) -> bytes:
    if kind == "truncate":
        return text[: where % len(text)].encode()
    if kind == "bytes":
        return where
    manifest = json.loads(text)
    if kind == "file":  # a files-table entry and the model file both name it
        manifest["files"][where] = {"size": 5, "sha256": "0" * 64}
        manifest["target"]["files"]["model"] = where
    else:
        *parents, last = where
        node = manifest
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if kind == "delete":
                node.pop(last, None)
            else:
                node[last] = value
    return json.dumps(manifest).encode()


@pytest.fixture(scope="module")
def hostile_copy(tiny_artifact, tmp_path_factory):
    """A copy of tiny:llama with a secret beside it, a link to it inside, and a guard that fails
    on any Python-level open of the secret."""
    root = tmp_path_factory.mktemp("hostile")
    copy = root / "artifact"
    shutil.copytree(tiny_artifact("llama"), copy)
    (root / "outside").mkdir()
    (root / "outside" / "secret").write_text("secret")
    (copy / "escape").symlink_to(root / "outside" / "secret")
    opened = []
    secret = str(root / "outside")

    def audit(event, args):
        if event == "open" and args and str(args[0]).startswith(secret):
            opened.append(args[0])

    sys.addaudithook(audit)  # cannot be removed: it only looks at paths under this test's root
    return _Copy(copy, (copy / "llmc.json").read_text(), opened)


class _Copy:
    def __init__(self, path, manifest: str, opened: list):
        self.path, self.manifest, self.opened = path, manifest, opened

    def __repr__(self) -> str:  # what hypothesis prints of a failing example
        return f"<copy of tiny:llama at {self.path}>"


@settings(BOUNDED, max_examples=50)
@given(mutation=mutations, check=st.booleans())
def test_a_malformed_manifest_is_one_artifact_error(hostile_copy, mutation, check):
    copy, original, opened = hostile_copy.path, hostile_copy.manifest, hostile_copy.opened
    (copy / "llmc.json").write_bytes(_mutate(original, *mutation))
    try:
        gen = rt.load(copy, check=check)
        gen.generate("Hello", max_new_tokens=2)
        event("loaded and generated")
    except LlmcError as exc:
        refusal(exc)
    finally:
        (copy / "llmc.json").write_text(original)
    assert not opened, f"read outside the artifact: {opened}"
