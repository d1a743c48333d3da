"""OpenVINO target: every tiny architecture end to end, the stateful IR and the fusions the CPU
plugin makes of it, precision, and the native runner (llmc-run) against the Python runtime."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import llmc.runtime as rt
from llmc.artifact import read_manifest
from llmc.cli import cli
from tests.conftest import TINY_ARCHS
from tests.test_passes import GOLDEN
from tests.test_tiny_end_to_end import PROMPT, check_batch_equals_rows

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "build" / "native" / "llmc-run"


@pytest.fixture(scope="module")
def ov_artifact(tiny_artifact):
    return lambda arch: tiny_artifact(arch, target="openvino")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_architecture_is_stateful_and_fused(arch, ov_artifact, tiny_model):
    """What the plugin made of each family (parity, greedy and batches: test_conformance.py)."""
    path = ov_artifact(arch)
    m = read_manifest(path)
    assert m["io"]["kv_mode"] == "stateful" and m["io"]["past_inputs"] == []
    model, _ = tiny_model(arch)
    layers = m["model"]["num_layers"]
    # One SDPA per layer, reading its KV cache from state; a logit soft-cap has no SDPA form.
    softcap = getattr(model.config.get_text_config(), "attn_logit_softcapping", None)
    sdpa = 0 if softcap else layers
    histogram, fused = m["graph"]["op_histogram"], m["target"]["fused_ops"]
    assert histogram.get("ScaledDotProductAttention", 0) == fused["StatefulSDPA"] == sdpa
    assert histogram["ReadValue"] == fused["MemoryInput"] == 2 * layers  # K and V per layer
    # The plugin fuses RoPE wherever llmc's fuse_rotary finds it (none in gpt2, cohere's is
    # interleaved), and RMS at least for every RMSNorm module (cohere's bias-free LayerNorm
    # becomes an RMS of the centred input).
    assert fused.get("RoPE", 0) == GOLDEN[arch]["fuse_rotary"]
    rms_modules = sum(type(mod).__name__.endswith("RMSNorm") for mod in model.modules())
    assert fused.get("RMS", 0) >= rms_modules == GOLDEN[arch]["fuse_rms_norm"]
    gen = rt.load(path, paged=False)
    if arch == "llama":  # v into [B, H, S, D] and the output back, per layer: no q/k round trip
        from llmc.targets.openvino.emit import runtime_ops

        assert runtime_ops(gen.model.compiled)["Transpose"] == 2 * 2
    names = {p.get_any_name() for p in gen.model.compiled.inputs}
    assert names == {"input_ids", "position_ids", "attention_mask", "logits_index", "beam_idx"}
    assert [p.get_any_name() for p in gen.model.compiled.outputs] == ["logits"]
    # by default the runtime rewrites it to paged attention, one layer each, where no sliding
    # window is recorded (the rewrite does not carry llmc's window masks)
    paged = rt.load(path).model
    assert (paged.paged is None) == bool(m["target"]["sliding_window"])
    # the build verified the file as every runtime runs it: rewritten by llmc's, and as it is
    forms = ["stateful"] if paged.paged is None else ["paged-attention", "stateful"]
    assert m["verification"]["forms"] == forms
    if paged.paged is not None:
        ops = [op.get_type_name() for op in paged.paged.get_ops()]
        assert ops.count("PagedAttentionExtension") == layers
        compiled = {p.get_any_name() for p in paged.compiled.inputs}
        assert "ReadValue" not in ops and "beam_idx" not in compiled and "key_cache.0" in compiled


def test_batched_left_padded_rows_and_a_reset_state(ov_artifact):
    gen = rt.load(ov_artifact("llama"))
    assert check_batch_equals_rows(gen) == check_batch_equals_rows(gen)  # state reset each time


def test_static_decode_model_computes_the_dynamic_models_logits(ov_artifact):
    import numpy as np

    path = ov_artifact("qwen2")
    models = [rt.load(path, static_decode=s, paged=False).model for s in (True, False)]
    assert models[0].static_decode and not models[0]._decoders.keys() - {1}  # batch 1 at load
    static, dynamic = (m.sequence() for m in models)
    rows = np.array([[5, 9, 2, 7], [3, 3, 8, 1]])
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])  # a left-padded row
    for session in (static, dynamic):
        session.logits = [session.prefill(rows, mask)]
        session.logits += [session.decode(np.array([[t], [t + 1]])) for t in (4, 11, 6)]
    assert 2 in static._decoders and static._live is static._decoders[2]
    assert dynamic._live is dynamic._request and not dynamic._decoders
    for a, b in zip(static.logits, dynamic.logits, strict=True):
        np.testing.assert_array_equal(a, b)  # same kernels, other shapes: bit-identical
    # a new sequence starts from the dynamic model's empty state again
    np.testing.assert_array_equal(static.prefill(rows, mask), static.logits[0])
    assert static._live is static._request


def test_paged_rows_hold_blocks_and_give_them_back(ov_artifact):
    """The paged sequence: rows of different lengths in one step (a prompt joining beside
    decoding rows), its pool growing under live rows without changing them, rollback and
    leaving giving blocks back, logits equal to the stateful model's throughout."""
    import numpy as np

    path = ov_artifact("llama")
    paged, stateful = (rt.load(path, paged=p).model for p in (True, False))
    seq, ref = paged.sequence(), stateful.sequence()
    block = seq._pool.block
    ids = np.arange(3, 3 + 2 * block).reshape(1, -1) % paged.vocab_size  # two blocks exactly
    np.testing.assert_allclose(seq.prefill(ids), ref.prefill(ids), atol=1e-4)
    assert seq.kv_bytes == 2 * seq._pool.block_bytes and seq._pool.capacity == 4
    long = list(range(7, 7 + 3 * block))  # joins with three blocks: the pool grows to 8
    np.testing.assert_allclose(seq.add([long]), ref.add([long]), atol=1e-4)
    assert seq._pool.capacity == 8 and seq.lengths.tolist() == [2 * block, 3 * block]
    step = np.array([[11, 12, 13], [21, 22, 23]])
    np.testing.assert_allclose(seq.extend(step), ref.extend(step), atol=1e-4)  # both verify 3
    seq.truncate([2 * block, 3 * block])  # reject all three: row 0 gives its third block back
    ref.truncate([2 * block, 3 * block])
    assert seq.kv_bytes == 5 * seq._pool.block_bytes
    last = np.array([[5], [6]])
    np.testing.assert_allclose(seq.decode(last), ref.decode(last), atol=1e-4)
    seq.remove([0])
    ref.remove([0])
    assert seq.kv_bytes == 4 * seq._pool.block_bytes  # row 1: 3 blocks + 1 position
    np.testing.assert_allclose(seq.decode(last[1:]), ref.decode(last[1:]), atol=1e-4)
    seq.remove([0])
    assert seq.kv_bytes == 0 and seq._pool.capacity == 0  # the last row left: memory freed
    # at bf16 the plugin keeps an 8-bit cache whose key blocks hold their scales as extra rows:
    # a block is still 32 positions (the value cache's), and three blocks' worth stays close
    bf16 = rt.load(path, precision="bf16").model.sequence()
    assert bf16._pool.block == block
    long = np.arange(3, 3 + 3 * block).reshape(1, -1) % paged.vocab_size
    want = paged.sequence().prefill(long)
    assert np.abs(bf16.prefill(long) - want).max() <= 0.05 * np.abs(want).max()


def test_paged_verification_steps_run_padded_to_one_shape(ov_artifact, int8_artifact):
    """On the fast int8 kernels a one-row step of 2 to 15 tokens with every position's logits
    (a speculative verification) runs padded to VERIFY_TOKENS, so the dynamic model sees one
    shape: its logits are the unpadded step's, and blocks that only the padding needed go back.
    An fp32 artifact's steps run as they come, and so do int8 ones where the CPU has no int8
    dot products (the plugin then quantizes no activations); the padding is tested anyway."""
    import numpy as np

    from llmc.host import int8_dot
    from llmc.targets.openvino.paged import VERIFY_TOKENS

    assert rt.load(ov_artifact("llama")).model.sequence().extend_sizes is None
    model = rt.load(int8_artifact).model
    assert model.dynamic_quantization and model.form == "paged-attention"
    seq, ref = model.sequence(), model.sequence()
    assert seq.extend_sizes == ((VERIFY_TOKENS,) if int8_dot() else None)
    seq._pads, ref._pads = True, False
    block = seq._pool.block

    class Recorder:  # the dynamic model's request, recording the tokens of each call
        def __init__(self, request):
            self.request, self.tokens = request, []

        def infer(self, feeds, share_inputs):
            self.tokens.append(len(feeds["input_ids"]))
            return self.request.infer(feeds, share_inputs=share_inputs)

        def get_tensor(self, name):
            return self.request.get_tensor(name)

    ids = np.arange(3, 3 + block - 4).reshape(1, -1) % model.vocab_size  # padding crosses a block
    np.testing.assert_array_equal(seq.prefill(ids), ref.prefill(ids))
    seq._request = recorder = Recorder(seq._request)
    assert seq.extend_sizes == (VERIFY_TOKENS,)
    for n in (2, 5, VERIFY_TOKENS - 1, VERIFY_TOKENS):
        held = int(seq.lengths[0])
        step = (np.arange(n) * 7 + n).reshape(1, -1) % model.vocab_size
        np.testing.assert_allclose(seq.extend(step), ref.extend(step), atol=1e-5)
        assert seq.kv_bytes == -(-(held + n) // block) * seq._pool.block_bytes
        seq.truncate([held + 1])  # one accepted: the rest rolls back
        ref.truncate([held + 1])
    assert recorder.tokens == [VERIFY_TOKENS] * 4
    last = np.array([[9]])
    np.testing.assert_allclose(seq.decode(last), ref.decode(last), atol=1e-5)
    assert recorder.tokens == [VERIFY_TOKENS] * 4  # a decode step runs on the one-row copy


def test_paged_attention_is_refused_in_a_sentence_where_it_cannot_run(tmp_path, ov_artifact):
    import shutil

    from llmc.errors import SessionError

    path = tmp_path / "windowed"
    shutil.copytree(ov_artifact("llama"), path)
    m = read_manifest(path)
    m["target"]["sliding_window"] = 16  # as the emitter records a windowed model
    (path / "llmc.json").write_text(__import__("json").dumps(m))
    assert rt.load(path).model.paged is None  # by default: the stateful model
    with pytest.raises(SessionError, match="cannot run with paged attention: it has a sliding"):
        rt.load(path, paged=True)


def test_stateful_model_extends_truncates_and_batches(ov_artifact, monkeypatch):
    """What the conformance suite checks of the default (paged) model, on the stateful one that
    windowed and --compat artifacts run (and `paged=False`)."""
    from tests.test_batching import check_join_and_leave
    from tests.test_speculative import check_extend_and_truncate, check_speculative_greedy

    gen = rt.load(ov_artifact("llama"), paged=False)
    assert gen.model.paged is None
    ids = gen.encode(PROMPT)
    check_extend_and_truncate(gen, ids)
    assert check_speculative_greedy(gen, ids, None, monkeypatch).accepted > 0
    check_join_and_leave(gen)


def test_precision_is_exact_by_default_and_bf16_only_when_asked(tmp_path, ov_artifact):
    from llmc.targets.openvino.session import EXACT, unpinned

    model = rt.load(ov_artifact("llama"), paged=False).model
    paged = rt.load(ov_artifact("llama")).model
    assert model.fast_kernels is None  # an fp32 artifact has no faster kernels to choose
    assert paged.paged is not None and paged.fast_kernels is None
    assert paged.static_decode and list(paged._decoders) == [1]  # one row's paged decode copy
    for compiled in (model.compiled, model._decoders[1], paged.compiled, paged._decoders[1]):
        # every numeric property as pinned, whatever this CPU would pick by itself
        assert unpinned(compiled, EXACT) == []
        assert compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0
        for hint in ("INFERENCE_PRECISION_HINT", "KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION"):
            assert compiled.get_property(hint).to_string() == "f32"
    # a server's threads are not bound to cores (Options.pin_threads); the numbers are the same
    free = rt.load(ov_artifact("llama"), pin_threads=False).model
    assert free.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert unpinned(free.compiled, EXACT) == []
    out = _build(tmp_path / "bf16", "--precision", "bf16")
    m = read_manifest(out)
    assert m["target"]["precision"] == "bf16" and m["verification"]["passed"]  # verified at f32
    bf16 = rt.load(out).model
    assert bf16.precision == "bf16"
    assert bf16.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() in ("bf16", "f32")
    result = CliRunner().invoke(cli, ["build", "tiny:llama", "-o", str(tmp_path / "x")] + [
        "--precision", "bf16"])  # fmt: skip
    assert result.exit_code == 2 and "--target openvino" in result.output
    assert not (tmp_path / "x").exists()


def _build(out: Path, *extra: str) -> Path:
    args = ["build", "tiny:llama", "--target", "openvino", "-o", str(out), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def runner():
    """The native runner, built by `make native` (which `make test` runs first)."""
    if not RUNNER.exists():
        subprocess.run(["make", "-C", str(ROOT), "native"], check=True, capture_output=True)
    return RUNNER


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
    """tiny:llama at int8: its fast kernels differ from the exact ones within 18 greedy steps."""
    out = tmp_path_factory.mktemp("ov-int8") / "a"
    result = CliRunner().invoke(cli, ["build", "tiny:llama", "-t", "openvino", "-o", str(out)] + [
        "--quant", "int8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-int8"])
def test_native_runner_generates_the_python_runtime_tokens(
    arch, ov_artifact, int8_artifact, runner
):
    """The runner pins the exact properties as the session does: on an int8 artifact its tokens
    are the exact session's (on a CPU with VNNI or AMX the plugin would otherwise quantize the
    activations)."""
    path = int8_artifact if arch == "llama-int8" else ov_artifact(arch)
    gen = rt.load(path, exact=True)
    ids = gen.encode(PROMPT)
    want = [int(t[0]) for t in gen.generate_ids([ids], rt.GenerationConfig(24, ignore_eos=True))]
    args = [str(runner), str(path), "--max-new-tokens", "24", "--threads", "2", *map(str, ids)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [int(t) for t in done.stdout.split()] == want
    assert "decode_tokens_per_s" in done.stderr


def test_native_runner_refuses_bad_arguments_with_exit_2(ov_artifact, runner):
    done = subprocess.run([str(runner), str(ov_artifact("llama")), "12", "x"], capture_output=True)
    assert done.returncode == 2 and b"not a token id or option: x" in done.stderr
    done = subprocess.run([str(runner), str(ov_artifact("llama"))], capture_output=True)
    assert done.returncode == 2


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_weights_stay_compressed_and_pass_the_quality_gate(quant, tmp_path, ov_artifact):
    """int4 on a model already on Q4_1 grids (fractional zero points, kept as f32 constants):
    nothing lost; int8 on the random tiny model: within the 5% gate. The codes are u4/u8 (i8
    when symmetric) constants, and the plugin folds their decompression into its matmuls: as
    many FullyConnected nodes as the fp32 artifact, no extra ones."""
    import openvino as ov

    from llmc.compiler import tiny
    from llmc.targets.openvino.emit import runtime_ops
    from tests.test_quantization import DATA, gridded_tiny_llama

    source = "tiny:llama"
    if quant == "int4":
        source = str(tmp_path / "gridded")
        gridded_tiny_llama().save_pretrained(source)
        tiny.build_tokenizer().save_pretrained(source)
    out = tmp_path / "a"
    args = ["build", source, "-t", "openvino", "-o", str(out), "--quant", quant, "--eval", DATA]
    args += ["--no-plan"]  # the fixed recipe, gated (test_precision.py covers plans)
    result = CliRunner().invoke(cli, [*args, "--eval-tokens", "300", "--max-ppl-increase", "5%"])
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    assert m["verification"]["passed"] and m["verification"]["max_abs_diff"] <= 1e-4
    evaluation = m["evaluation"]
    if quant == "int4":  # the grid is kept with fractional zero points: exact by default, lossless
        assert m["target"]["dynamic_quantization"] is False and "exact" not in evaluation
        assert abs(evaluation["increase"]) <= 1e-4
    else:  # the default (fast) kernels' perplexity, and the exact ones'
        assert m["target"]["dynamic_quantization"] is True
        assert evaluation["increase"] <= 0.05 and evaluation["exact"]["increase"] <= 0.05
    model = ov.Core().read_model(str(out / "openvino_model.xml"))
    kinds = {op.get_output_element_type(0).get_type_name() for op in model.get_ops()}
    assert ("u4" if quant == "int4" else "i8") in kinds
    fp32 = rt.load(ov_artifact("llama")).model
    size = (out / "openvino_model.bin").stat().st_size
    assert size < 0.45 * (ov_artifact("llama") / "openvino_model.bin").stat().st_size
    session = rt.load(out).model
    fc = runtime_ops(session.compiled)["FullyConnected"]
    assert fc == runtime_ops(fp32.compiled)["FullyConnected"]
    assert len(rt.load(out).generate("Paris is", max_new_tokens=8)) > 0
    if quant == "int8":
        check_fast_kernels_are_a_recorded_choice(out, session)
    else:  # the plugin has no faster kernel for fractional zero points: nothing to choose
        assert session.fast_kernels is None and "fast_kernels" not in m["verification"]


def check_fast_kernels_are_a_recorded_choice(out: Path, fast) -> None:
    """A quantized artifact's default session lets the plugin quantize activations (dynamic
    quantization); `exact=True` pins it off. The build measured the distance of the default,
    recorded it with the CPU it ran on, and `llmc inspect` shows it."""
    from llmc.targets.openvino.session import DYNAMIC_QUANTIZATION_GROUP, EXACT, unpinned

    exact = rt.load(out, exact=True).model
    assert exact.fast_kernels is None and unpinned(exact.compiled, EXACT) == []
    assert "dynamic quantization" in fast.fast_kernels
    group = fast.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")
    assert group == DYNAMIC_QUANTIZATION_GROUP
    assert unpinned(fast.compiled, EXACT) == [f"DYNAMIC_QUANTIZATION_GROUP_SIZE={group} (asked 0)"]
    m = read_manifest(out)
    record = m["verification"]["fast_kernels"]
    assert record["kernels"] == fast.fast_kernels and record["steps_compared"] == 18
    assert record["max_abs_diff"] >= 0 and m["build"]["host"]["model"]
    shown = " ".join(CliRunner().invoke(cli, ["inspect", str(out)]).output.split())  # unwrapped
    assert "fast kernels (the default; --exact or exact=True turns them off)" in shown
    assert "dynamic quantization" in shown and "measured on" in shown
