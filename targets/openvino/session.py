"""Runtime model and sequences for OpenVINO artifacts (numpy in, numpy out; no torch).

The model holds the compiled models (shared by every sequence); each sequence has its own infer
requests, and its KV cache is their state (`stateful` KV mode): `reset_state()` at the start of
every sequence, `beam_idx` = the rows in order, and a rollback (`truncate`) cuts the state
tensors [B, KV heads, T, head dim] to the columns kept.
Precision is explicit: an fp32 artifact runs with f32 inference and an f32 KV cache unless the
caller asks for bf16, because this CPU plugin otherwise computes "fp32" models in bf16 with a
u8/f16 cache.

Static decode: the artifact's model has dynamic shapes (any batch, any number of new tokens), and
the CPU plugin then infers shapes and plans memory on every call. A decode step always feeds one
token per row, so the session also compiles a copy of the model reshaped to exactly that
(`input_ids` [B, 1]; only the context length stays dynamic) and moves the KV state into it after
the prefill. Measured on SmolLM2-135M here, a decode step is 10% (fp32) to 16% (int8) faster, and
the logits are bit-identical. The price is a second compiled copy of the weights (+550 MB for fp32
SmolLM2), so by default it is on only where that fits easily in free memory (`static_decode`)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from llmc.artifact_checks import artifact_file, reason
from llmc.errors import ArtifactError, SessionError
from llmc.runtime.padded import PaddedRows, PositionTracker
from llmc.runtime.session import Model as BaseModel
from llmc.runtime.session import Sequence as BaseSequence
from llmc.runtime.session import SessionOptions
from llmc.targets.base import step_feeds
from llmc.targets.openvino.paged import PagedSequence, paged_decoder, paged_model

# Every CPU-plugin property of OpenVINO 2026.4 that changes the arithmetic, pinned, so that
# "exact" is the same computation on every CPU generation. Left to the plugin, each one is chosen
# by the CPU: with AVX512-BF16 or AMX it computes an f32 model in bf16 and keeps a u8 KV cache, and
# with AVX512-VNNI or AMX it quantizes the activations of matmuls with compressed weights to int8
# in groups of 32 (dynamic quantization; a tiny int8 model then drifts by 0.19 in its logits).
EXACT = {
    "INFERENCE_PRECISION_HINT": "f32",
    "EXECUTION_MODE_HINT": "ACCURACY",
    "KV_CACHE_PRECISION": "f32",
    "KEY_CACHE_PRECISION": "f32",  # the key and value caches have their own settings too
    "VALUE_CACHE_PRECISION": "f32",
    "KEY_CACHE_GROUP_SIZE": "0",
    "VALUE_CACHE_GROUP_SIZE": "0",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",  # activations stay f32
    "CPU_DENORMALS_OPTIMIZATION": "NO",  # no flush-to-zero
    "CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE": "1",  # no sparse-weight kernels
}
PRECISIONS = {
    # name: compile properties
    "f32": EXACT,
    "bf16": {"INFERENCE_PRECISION_HINT": "bf16"},  # and the plugin's defaults for the rest
}
# The fast decode kernels of a quantized artifact: exact, except that the activations entering a
# matmul with compressed weights are quantized to int8 in groups of this many values, the
# plugin's own default where the CPU has VNNI or AMX (README, "OpenVINO").
DYNAMIC_QUANTIZATION_GROUP = 32
# Rolled-back (masked) KV columns a sequence keeps before compacting its state.
HOLES = 64
RAGGED = -1  # the batch size of the decode model that takes any number of rows


def _free_memory() -> int | None:
    """MemAvailable in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def static_decode_fits(weights_bytes: int) -> bool:
    """Whether a second compiled copy of the weights leaves plenty of memory (the copy takes up
    to twice the compressed weights' size: the plugin repacks them)."""
    free = _free_memory()
    return free is None or 4 * weights_bytes < free


def compile_properties(
    precision: str, threads: int | None, dynamic_quantization: int = 0, pin: bool = True
) -> dict:
    """The properties a model is compiled with; `dynamic_quantization` > 0 (f32 only) lets the
    plugin quantize activations in groups of that size; `pin`: inference threads bound to
    cores (the plugin's default)."""
    props = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", **PRECISIONS[precision]}
    if dynamic_quantization:
        props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = str(dynamic_quantization)
    if threads:
        props["INFERENCE_NUM_THREADS"] = str(threads)
    if not pin:
        props["ENABLE_CPU_PINNING"] = "NO"
    return props


def vendor_properties() -> dict:
    """What a --compat openvino-genai model asks every OpenVINO runtime to compile it with (its
    rt_info's runtime_options, which the CPU plugin applies unless the caller sets them): an f32
    KV cache and f32 activations into matmuls with compressed weights, the numbers llmc
    verifies (the plugin's defaults are an 8-bit cache and int8 activations on CPUs with VNNI or
    AMX). The plugin takes no inference precision from there: on a CPU with AVX512-BF16 or AMX
    a caller passes INFERENCE_PRECISION_HINT=f32 for the verified numbers."""
    keys = ("KV_CACHE", "KEY_CACHE", "VALUE_CACHE", "DYNAMIC_QUANTIZATION_GROUP_SIZE")
    return {k: v for k, v in EXACT.items() if k.startswith(keys)}


def unpinned(compiled, wanted: dict) -> list[str]:
    """The numeric properties of `wanted` (EXACT's keys) that `compiled` does not report as set:
    a plugin that ignored a pin must not pass for exact."""

    def text(value) -> str:
        if isinstance(value, bool):
            return "YES" if value else "NO"
        if isinstance(value, (int, float)):
            return f"{float(value):g}"
        if hasattr(value, "to_string"):  # an element type
            return value.to_string()
        return getattr(value, "name", str(value))  # an enum

    def norm(value: str) -> str:
        return f"{float(value):g}" if value.replace(".", "", 1).isdigit() else value

    return [
        f"{key}={text(compiled.get_property(key))} (asked {wanted[key]})"
        for key in EXACT
        if key in wanted and text(compiled.get_property(key)) != norm(wanted[key])
    ]


@dataclass(frozen=True)
class Options(SessionOptions):
    """precision: "f32" (exact) or "bf16" (faster where the CPU has AVX512-BF16 or AMX, not
    verified); None: what the artifact was built for. paged: run the model rewritten to paged
    attention (targets/openvino/paged.py; None: wherever the rewrite takes the artifact).
    static_decode: decode through a copy of the model reshaped to one new token per row (paged:
    for one row; None: when it fits easily in free memory). pin_threads: bind the inference
    threads to cores (the plugin's default). A server runs them unpinned: its event loop and
    any clients on the machine compute while a step runs, and a pinned thread waits for its
    core where an unpinned one moves (SmolLM2 fp32 at 8 HTTP clients here: 1.11x the
    throughput unpinned, paired over 3 alternations)."""

    precision: str | None = None
    static_decode: bool | None = None
    paged: bool | None = None
    pin_threads: bool = True


class Model(BaseModel):
    Options = Options

    def __init__(
        self, directory: str | os.PathLike, manifest: dict, options: Options | None = None
    ):
        """`exact`: every numeric property pinned (EXACT), what verification compares with the
        graph; otherwise a quantized f32 artifact whose zero points are integers runs on the fast
        kernels (int8 activations, DYNAMIC_QUANTIZATION_GROUP), whose distance from the exact
        ones the build records."""
        super().__init__(directory, manifest, options)
        exact, precision = self.options.exact, self.options.precision
        threads, static_decode = self.options.threads, self.options.static_decode
        import openvino as ov

        target = manifest["target"]
        self.precision = "f32" if exact else precision or target.get("precision", "f32")
        if self.precision not in PRECISIONS:
            raise SessionError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}."
            )
        if exact and precision not in (None, "f32"):
            raise SessionError(f"exact=True runs at f32; it cannot run at {precision}.")
        # fast kernels where the plugin has them: quantized weights with integer zero points
        quantized = bool(manifest.get("quantization"))
        fast = quantized and target.get("dynamic_quantization", False)  # older: not measured
        fast = fast and not exact and self.precision == "f32"
        self.dynamic_quantization = DYNAMIC_QUANTIZATION_GROUP if fast else 0
        self.fast_prompts = fast  # prompts (and so perplexity) run on the fast kernels too
        self.fast_kernels = (
            f"dynamic quantization: int8 activations in groups of {self.dynamic_quantization}"
            if fast
            else None
        )
        core = ov.Core()
        xml = artifact_file(directory, target.get("files", {}).get("model"), "its model")
        bin_rel = str(xml.relative_to(directory).with_suffix(".bin"))  # OpenVINO reads it too
        artifact_file(directory, bin_rel, "its weights")
        try:
            self._core, self._model = core, core.read_model(str(xml))
        except Exception as exc:  # OpenVINO's own errors, on a malformed model
            raise ArtifactError(
                f"OpenVINO cannot read {xml} ({reason(exc)}); rebuild the artifact."
            ) from None
        self._properties = compile_properties(
            self.precision, threads, self.dynamic_quantization, self.options.pin_threads
        )
        # older artifacts do not say: assume a window, so that rollbacks compact at once
        self.sliding_window = int(target.get("sliding_window", 1))
        self.paged = paged_model(self, self._model, self.options.paged)
        self.form = "stateful" if self.paged is None else "paged-attention"
        self.compiled = self._compile(self._model if self.paged is None else self.paged)
        self.inputs = {p.get_any_name() for p in self._model.inputs}
        outputs = {o.get_any_name(): list(o.get_partial_shape()) for o in self._model.outputs}
        outputs = {
            k: [d.get_length() if d.is_static else None for d in v] for k, v in outputs.items()
        }
        self.check_io(self.inputs, outputs, "its OpenVINO model")
        if static_decode is None:
            static_decode = static_decode_fits(xml.with_suffix(".bin").stat().st_size)
        self.static_decode = static_decode
        self._decoders: dict[int, object] = {}  # batch size -> the static decode model
        self._lock = threading.Lock()  # compiles a static decode model once
        if static_decode:
            self.decoder(1)  # compile now: the first decode step must not pay for it

    def sequence(self) -> Sequence:
        if self.io.recurrent:
            return self._recurrent_sequence()
        if self.paged is not None:
            return PagedSequence(self, self.compiled)
        return Sequence(self)

    def other_forms(self) -> dict[str, dict]:
        return {} if self.paged is None else {"stateful": {"paged": False}}

    def _recurrent_sequence(self):
        """A state-space model's sequence (runtime/recurrent.py) on infer requests of its own
        (with static decode, decode steps on the model reshaped to their exact shapes, state
        included). Its state stays explicit inputs and outputs rather than OpenVINO state: it is
        small (tiny Mamba: 18 KB a row; 129M: 2.8 MB), a step reads and writes it whole anyway,
        and rollback, rows joining and leaving need it as arrays (one code path for every
        target)."""
        from llmc.runtime.recurrent import RecurrentSequence

        requests: dict[int, object] = {}  # batch size of a static decode model (0: dynamic)

        def run(feeds, names):
            rows, step = feeds["input_ids"].shape
            key = rows if self.static_decode and step == 1 else 0
            if key not in requests:
                compiled = self.decoder(rows) if key else self.compiled
                requests[key] = compiled.create_infer_request()
            request = requests[key]
            request.infer(feeds, share_inputs=True)
            return [request.get_tensor(n).data.copy() for n in names]

        return RecurrentSequence(self, run)

    def _compile(self, model):
        compiled = self._core.compile_model(model, "CPU", self._properties)
        if self.precision == "f32" and (off := unpinned(compiled, self._properties)):
            raise ArtifactError(
                f"OpenVINO's CPU plugin did not take the exact settings ({', '.join(off)}); "
                "use an OpenVINO release llmc supports (pip install 'llmc[openvino]')."
            )
        return compiled

    def prepare_batching(self) -> None:
        """Compile the decode model of any batch size; drop the one-row copy compiled at load,
        which a batch whose rows come and go never runs (it decodes on RAGGED at every size):
        it would only hold a copy of the weights (compiled again if a fixed batch asks). The
        paged model takes any batch as it is: it keeps no copy at all."""
        if self.paged is not None:
            with self._lock:
                self.static_decode = False
                self._decoders.clear()
        elif self.static_decode:
            self.decoder(RAGGED)
            with self._lock:
                self._decoders.pop(1, None)

    def decoder(self, batch: int):
        """The compiled model reshaped for `batch` rows of one new token each (-1: any number
        of rows; a batch whose rows come and go decodes on it: SmolLM2 bf16, 8 rows, 10.8 ms
        a step against 9.9 ms on a model of exactly 8 rows and 12.4 ms on the dynamic one)."""
        with self._lock:
            if batch not in self._decoders:
                import openvino as ov

                if self.paged is not None:  # `batch` rows, one token each: flat [batch]
                    self._decoders[batch] = self._compile(paged_decoder(self.paged, batch))
                    return self._decoders[batch]
                fixed = {
                    "input_ids": [batch, 1],
                    "position_ids": [batch, 1],
                    "attention_mask": [batch, 1 if self.io.recurrent else -1],  # context: dynamic
                    "logits_index": [1],
                    "beam_idx": [batch],
                }
                if self.io.recurrent:  # every shape static: the state's too
                    shapes = self.io.cache.shapes(batch)
                    fixed.update(zip(self.io.past_inputs, map(list, shapes), strict=True))
                model = self._model.clone()
                shapes = {p: ov.PartialShape(fixed[p.get_any_name()]) for p in model.inputs}
                model.reshape(shapes)
                self._decoders[batch] = self._compile(model)
            return self._decoders[batch]


class Sequence(PaddedRows, BaseSequence):
    """Rows on one OpenVINO model: an infer request of the dynamic model and, with static
    decode, one of the static decode model per batch size; the KV state moves to the request
    that runs the step. A batch whose rows come and go (`add`, `remove`: continuous batching)
    decodes on the one-token model of any batch size (RAGGED), not one compiled per size."""

    def __init__(self, model: Model):
        super().__init__(model)
        self._request = model.compiled.create_infer_request()
        self._positions = PositionTracker(model.max_context)
        self._decoders: dict[int, object] = {}  # batch size -> infer request
        self._live = self._request  # the request that holds this sequence's KV cache
        self._ragged = False  # rows were added or removed since the prefill

    def _decoder(self, batch: int):
        if batch not in self._decoders:
            self._decoders[batch] = self.model.decoder(batch).create_infer_request()
        return self._decoders[batch]

    def _use(self, request) -> None:
        """Make `request` the one holding the KV cache, moving the state over if needed."""
        if request is not self._live:
            states = {s.name: s.state for s in self._live.query_state()}
            for state in request.query_state():
                state.state = states[state.name]
            self._live = request

    def _reset(self) -> None:
        self._positions.reset()
        self._request.reset_state()
        self._live = self._request
        self._ragged = False

    def _states(self) -> dict[str, np.ndarray]:
        return {s.name: s.state.data for s in self._live.query_state()}

    def _load_states(self, states: dict[str, np.ndarray]) -> None:
        """A new set of rows: into the request their next decode step runs on."""
        import openvino as ov

        self._ragged = True
        request = self._decoder(RAGGED) if self.model.static_decode else self._request
        for state in request.query_state():
            state.state = ov.Tensor(np.ascontiguousarray(states[state.name]))
        self._live = request

    def add(self, prompts) -> np.ndarray:
        logits = super().add(prompts)
        self._ragged = True  # whatever its first rows, the batch's size will change
        return logits

    def _lengths(self) -> np.ndarray:
        return self._positions.lengths

    def _truncate(self, lengths: np.ndarray) -> None:
        """Mask the rolled-back columns out (no copy); the state is compacted only once they
        add up (reading and writing it costs about 7 ms for 600 SmolLM2 positions, half a
        decode step)."""
        self._positions.truncate(lengths, drop=False)
        removable = int((~self._positions.mask.any(axis=0)).sum())
        if removable >= (1 if self.model.sliding_window else HOLES):
            self._compact()  # a sliding window counts columns: it must see no holes

    def _compact(self) -> None:
        import openvino as ov

        columns = self._positions.compact()
        for state in self._live.query_state():
            kept = state.state.data[:, :, columns]  # [B, KV heads, T, head dim]
            state.state = ov.Tensor(np.ascontiguousarray(kept))

    def _extend(self, ids: np.ndarray, mask, last_only: bool) -> np.ndarray:
        m = self.model
        if (
            self._positions.mask is not None
            and self._positions.length + ids.shape[1] > m.max_context
        ):
            self._compact()  # masked columns count against the model's context
        feeds = step_feeds(self._positions, ids, mask, all_positions=not last_only)
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        feeds["beam_idx"] = np.arange(ids.shape[0], dtype=np.int32)
        request = self._request
        decode_step = ids.shape[1] == 1 and last_only and mask.shape[1] > 1
        if m.static_decode and decode_step:
            request = self._decoder(RAGGED if self._ragged else ids.shape[0])
        self._use(request)
        request.infer({k: v for k, v in feeds.items() if k in m.inputs}, share_inputs=True)
        return request.get_tensor("logits").data.copy()  # [B, 1 or S, V]
