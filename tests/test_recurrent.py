"""State-space models (Mamba): the llmc ops of the selective scan and its convolution, the
recurrent-state contract, and the conformance of every target that builds them (parity with
transformers' own slow path, greedy tokens, batches, prompts longer than one step, rollback,
speculative decoding, rows joining and leaving, perplexity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llmc.runtime as rt
from llmc.artifact import read_manifest
from llmc.compiler import ssm_ops
from llmc.contract import IOContract, KVMode
from llmc.errors import SessionError
from llmc.targets import TARGETS
from tests.conftest import heavy_where
from tests.test_batching import check_join_and_leave
from tests.test_conformance import RUNNABLE, _perplexities
from tests.test_speculative import check_extend_and_truncate, check_speculative_greedy
from tests.test_tiny_end_to_end import PROMPT, check_batch_equals_rows, hf_greedy

RECURRENT = [name for name, info in RUNNABLE.items() if info.recurrent]
# every target's state-space families (the registry's recurrent_families)
# AOTInductor's C++ compile of a state-space model is 55 s of CI's 20 minutes: `make
# test-heavy` (CI keeps AOTInductor on the llama conformance cases)
CASES = [
    pytest.param(
        arch,
        name,
        id=f"{arch}-{name}",
        marks=[pytest.mark.heavy] if name == "inductor" else [],
    )
    for name in RECURRENT
    for arch in RUNNABLE[name].recurrent_families
]
# the runtime's checks (batches, rollback, speculative decoding, joins, perplexity) exercise the
# target's sequence, the same for every family: on the first family only
# a prompt longer than two of the graph's steps (ssm_ops.SCAN_TOKENS positions a call)
LONG = list(range(3, 3 + 2 * ssm_ops.SCAN_TOKENS + 17))


def _scan_inputs(s: int, batch: int = 2, d: int = 6, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u, z = torch.randn(batch, s, d, generator=g), torch.randn(batch, s, d, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(batch, s, d, generator=g))
    A = -torch.rand(d, n, generator=g) * 8  # strongly decaying channels too
    B, C = torch.randn(batch, s, n, generator=g), torch.randn(batch, s, n, generator=g)
    D, state = torch.randn(d, generator=g), torch.randn(batch, d, n, generator=g)
    return u, delta, A, B, C, D, z, state


@pytest.mark.parametrize("s", [1, 2, 7, ssm_ops.SCAN_TOKENS])
def test_scan_decomposition_is_the_recurrence(s):
    """The doubling-step scan targets lower equals the position-by-position reference, from a
    live state, up to one call's limit; and chunks of it carry the state exactly."""
    args = _scan_inputs(s)
    y_ref, h_ref = ssm_ops.selective_scan_ref(*args)
    y, h = ssm_ops.selective_scan_steps(*args)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(h, h_ref, atol=1e-5)
    cut = s // 2
    if cut:
        u, delta, A, B, C, D, z, state = args
        first = [t[:, :cut] for t in (u, delta)], [t[:, :cut] for t in (B, C)]
        y1, mid = ssm_ops.selective_scan_steps(*first[0], A, *first[1], D, z[:, :cut], state)
        rest = [t[:, cut:] for t in (u, delta)], [t[:, cut:] for t in (B, C)]
        y2, end = ssm_ops.selective_scan_steps(*rest[0], A, *rest[1], D, z[:, cut:], mid)
        assert torch.allclose(torch.cat([y1, y2], 1), y_ref, atol=1e-5)
        assert torch.allclose(end, h_ref, atol=1e-5)


def test_causal_conv_carries_its_state():
    """Two calls with the state between them compute one call over the whole sequence."""
    g = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(2, 9, 5, generator=g), torch.randn(5, 4), torch.randn(5)
    zero = torch.zeros(2, 5, 3)
    whole, state = ssm_ops.causal_conv1d_ref(x, zero, weight, bias)
    a, mid = ssm_ops.causal_conv1d_ref(x[:, :4], zero, weight, bias)
    b, end = ssm_ops.causal_conv1d_ref(x[:, 4:], mid, weight, bias)
    assert torch.allclose(torch.cat([a, b], 1), whole, atol=1e-6) and torch.equal(end, state)
    assert torch.equal(state, x[:, -3:].transpose(1, 2))


@pytest.mark.parametrize(("arch", "target"), CASES)
def test_tiny_state_space_conformance(arch, target, tiny_artifact, tiny_model, monkeypatch):
    path = tiny_artifact(arch, target=target)
    m = read_manifest(path)
    io = IOContract.from_manifest(m)
    assert (
        io.kv_mode is KVMode.RECURRENT
        and io.recurrent
        and io.past_inputs[:2]
        == [
            "past_state.0.conv",
            "past_state.0.ssm",
        ]
    )
    assert IOContract.from_manifest({"io": io.to_manifest(), "model": m["model"]}) == io
    ver = m["verification"]
    assert ver["passed"] and ver["max_abs_diff"] <= 1e-4 and ver["greedy_agreement"] == 18
    assert ver["batched_max_abs_diff"] <= 1e-4  # a left-padded batch: each row as alone
    model, tokenizer = tiny_model(arch)
    gen = rt.load(path)
    ids = tokenizer(PROMPT)["input_ids"]
    ours = [int(t[0]) for t in gen.generate_ids([ids], rt.GenerationConfig(32, ignore_eos=True))]
    assert ours == hf_greedy(model, ids, 32)
    # a prompt of several steps, then decode steps, against one eager forward of everything
    seq = gen.model.sequence()
    extra = [5, 17, 42, 99]
    got = [seq.prefill(np.array([LONG]))] + [seq.decode(np.array([[t]])) for t in extra]
    with torch.no_grad():
        full = model(torch.tensor([LONG + extra])).logits[0].numpy()
    assert np.abs(np.concatenate(got) - full[len(LONG) - 1 :]).max() <= 1e-4
    assert seq.kv_bytes == io.cache.row_bytes  # the same whatever the context
    with torch.no_grad():
        scored = seq.score(np.array(LONG))
        want = model(torch.tensor([LONG])).logits[0].numpy()
    assert np.abs(scored - want).max() <= 1e-4
    check_batch_equals_rows(gen)
    if arch != TARGETS[target].recurrent_families[0]:
        return
    check_extend_and_truncate(gen, ids)
    usage = check_speculative_greedy(gen, ids, None, monkeypatch)  # drafts partly wrong
    assert 0 < usage.accepted < usage.drafted
    assert check_speculative_greedy(gen, ids, "prompt-lookup", monkeypatch).steps > 0
    # its own artifact as the draft: that sequence rolls back several decode steps
    assert check_speculative_greedy(gen, ids, gen, monkeypatch).accepted > 0
    check_join_and_leave(gen)
    ours, reference = _perplexities(gen, model, tokenizer)
    assert abs(ours / reference - 1) <= 1e-5


@pytest.mark.parametrize(
    "target",
    # the one other build of tiny Mamba by AOTInductor (56 s of CI): `make test-heavy`, as above
    heavy_where(RECURRENT, lambda t: t == "inductor"),
)
def test_rollback_is_bounded_and_said(target, tiny_artifact):
    """A recurrent state rolls back the steps it kept the state of, and refuses further with a
    sentence; a draft's sequence keeps more."""
    gen = rt.load(tiny_artifact("mamba", target=target))
    seq = gen.model.sequence()
    seq.prefill(np.array([[3, 4, 5]]))
    seq.decode(np.array([[6]]))
    seq.decode(np.array([[7]]))
    with pytest.raises(SessionError, match="rolls back at most 1 step"):
        seq.truncate([3])  # two steps back
    seq.truncate([4])  # one step back: the state from before it
    deep = gen.model.sequence()
    deep.keep_rollback(4)
    deep.prefill(np.array([[3, 4, 5]]))
    deep.extend(np.array([[6, 7, 8]]))
    deep.decode(np.array([[9]]))
    deep.truncate([4])  # back into the extend before the last step: its token 6 is fed again
    ref = gen.model.sequence()
    ref.prefill(np.array([[3, 4, 5, 6]]))
    for got in (seq, deep):
        assert got.lengths.tolist() == [4]
        want = ref.extend(np.array([[7]]))[0, -1]
        assert np.abs(got.extend(np.array([[7]]))[0, -1] - want).max() <= 1e-5
        ref.truncate([4])


def test_tensorrt_network_of_a_state_space_model(tiny_artifact, tiny_model):
    """The TensorRT target's standard-ONNX network of a tiny Mamba: what its parser takes, a
    build spec whose profiles give the state its fixed shapes and prompts their steps, and in
    onnxruntime the greedy tokens of transformers (no engine can be built here)."""
    import importlib.util
    import json

    import onnx

    from llmc.targets.tensorrt import engine, parser_support
    from tests.test_tensorrt import verify_generator

    if importlib.util.find_spec("tensorrt") is not None or not TARGETS["tensorrt"].recurrent:
        pytest.skip("covers the network without TensorRT installed")
    path = tiny_artifact("mamba", target="tensorrt")
    network = onnx.load(str(path / "model.onnx"), load_external_data=False)
    assert all(n.domain in ("", "ai.onnx") for n in network.graph.node)
    assert parser_support.check(network) == []
    manifest = read_manifest(path)
    io = IOContract.from_manifest(manifest)
    assert manifest["verification"]["passed"] and manifest["target"]["engine"] is None
    spec = json.loads((path / engine.SPEC_FILE).read_text())
    prefill, decode = (p["shapes"] for p in spec["profiles"])
    assert prefill["input_ids"]["max"][1] == io.cache.step_tokens
    for name, shape in zip(io.past_inputs, io.cache.shapes(engine.MAX_BATCH), strict=True):
        assert prefill[name]["max"] == decode[name]["max"] == list(shape)
    model, tokenizer = tiny_model("mamba")
    ids = tokenizer(PROMPT)["input_ids"]
    gen = verify_generator(path)
    ours = [int(t[0]) for t in gen.generate_ids([ids], rt.GenerationConfig(32, ignore_eos=True))]
    assert ours == hf_greedy(model, ids, 32)
    with torch.no_grad():  # a prompt of three of the network's steps
        want = model(torch.tensor([LONG])).logits[0, -1].numpy()
    assert np.abs(gen.model.sequence().prefill(np.array([LONG]))[0] - want).max() <= 1e-4


def test_targets_without_the_recurrent_mode_refuse_it(tmp_path):
    """A target that cannot build a recurrent state, and quantization, are refused before the
    trace, in one sentence, with nothing written."""
    from tests.test_cli_errors import assert_nothing_written, assert_user_error, invoke

    able = ", ".join(t.name for t in TARGETS.values() if t.recurrent)
    cases = [(["--quant", "int8"], "--quant is not supported for mamba")]
    for t in TARGETS.values():
        if t.ready and not t.recurrent:
            cases.append((["--target", t.name], f"builds for --target {able}, not {t.name}"))
    for args, want in cases:
        out = tmp_path / "a"
        assert_user_error(invoke("build", "tiny:mamba", "--out", out, *args), want)
        assert_nothing_written(out)


def test_a_hybrid_model_is_refused_in_one_sentence(tmp_path):
    """Attention mixed with convolution layers (LFM2): refused before the trace, naming what
    llmc does build."""
    import transformers

    from llmc.compiler.tiny import build_tokenizer
    from tests.test_cli_errors import assert_nothing_written, assert_user_error, invoke

    config = transformers.Lfm2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
    )  # fmt: skip
    source = tmp_path / "lfm2"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    out = tmp_path / "out"
    result = invoke("build", source, "--out", out)
    assert_user_error(result, "'lfm2' mixes attention with recurrent", "mamba, falcon_mamba")
    assert_nothing_written(out)
