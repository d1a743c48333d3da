"""Runtime model and sequences for ONNX artifacts on onnxruntime (numpy in, numpy out; no torch).

The `Model` holds the onnxruntime sessions and decides which runs a step (the decode kernels,
or the exact prefill ones of a quantized artifact). Its sequences keep the KV cache in one of
two modes: `shared` (the default pipeline; shared_kv.py) or `concat` (when `rewire_kv_cache` is
disabled), where the runtime feeds the present tensors back as the next step's past.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np

from llmc.artifact_checks import artifact_file, reason
from llmc.contract import KVMode, Logits
from llmc.errors import ArtifactError
from llmc.runtime.padded import ConcatRows
from llmc.runtime.session import Model as BaseModel
from llmc.runtime.session import Sequence, SessionOptions
from llmc.targets.base import step_feeds
from llmc.targets.onnx.external import check_external_data
from llmc.targets.onnx.rescore import LmHeadRescorer, rescore_positions
from llmc.targets.onnx.shared_kv import SharedKVSequence

PREFILL_CHUNK = 256  # long prompts run in chunks: less attention work, bounded scratch memory
# A quantized artifact's prompts run on exact kernels that dequantize every weight on each call
# (about 0.35 s for int8 SmolLM2), which outweighs the attention that smaller chunks skip: a
# 1024-token int8 prompt takes 5.4 s in chunks of 256, 4.7 s in 512, 4.4 s in 1024 (fp32: 4.0 s
# whatever the chunk).
EXACT_PREFILL_CHUNK = 1024
# Without int8 dot products the fast kernels still beat the exact ones on short prompts: the exact
# ones pay about 0.33 s a call to dequantize the weights, the fast ones about 2.4 ms a prompt token
# (int8 SmolLM2 on a 2-core Zen 3 with AVX2 alone; a prompt alone, ms fast against exact: 8 tokens
# 32 against 372, 40: 98 against 406, 128: 322 against 639, 256: 635 against 858, 512: 1227
# against 1223). Fresh prompts of at most this many tokens (all rows together) run on them there,
# their last logits rescored as a decode's.
FAST_PROMPT = 256
# What a quantized artifact's default session computes differently from the exact one.
FAST_KERNELS = (
    "MatMulNBits accuracy level 4: int8 activations on decode steps and prompts of up to "
    f"{FAST_PROMPT} tokens, longer prompts exact"
)
EXACT_PROMPTS = "MatMulNBits accuracy level 4: int8 activations on decode steps, prompts exact"
FAST_EVERY_STEP = "MatMulNBits accuracy level 4: int8 activations on every step"
# Int8 dot products (llmc.host.INT8_DOT) make onnxruntime's int8-activation kernels fast for prompts
# as well (SmolLM2 int8, 512 tokens: 0.37 s with VNNI, against 0.41 s exact; without, 5.35 s on the
# machine of 2026-11-27 and 1.23 s on a Zen 3 with AVX2, against 1.22 s exact). With
# one of them, a quantized artifact runs prompts on the decode session too and holds one copy of
# its weights (SmolLM2 peak RSS, int8: 718 -> 389 MB; int4 Q4_1: 637 -> 364 MB); without, a
# second, exact session serves prompts longer than FAST_PROMPT.
# Extend steps of at most this many tokens on a live cache (verifying drafted tokens) run on the
# decode kernels, with every position's top logits rescored; longer ones run as a prefill.
SHORT_EXTEND = 16
# A request joining a running batch (continuous batching) prefills on the fast kernels up to this
# many prompt tokens: every running request waits for its prefill, and the exact kernels' fixed
# cost of dequantizing every weight would stall them all (int8 SmolLM2, 40-token prompt: 147 ms
# exact, 30 ms fast; 512 tokens: 421 and 290 ms). Its last logits are rescored as a decode's.
FAST_JOIN = 512


def _open(
    directory,
    manifest: dict,
    threads: int | None,
    accuracy_level: int | None = None,
    rescore=False,
    spin: bool = True,
    config: dict | None = None,
    in_graph: bool = True,
):
    """An onnxruntime session and its lm_head rescorer (or None). `accuracy_level` overrides
    every MatMulNBits' (0: dequantize the weights and multiply in fp32, exactly what the llmc op
    computes); `rescore`: exact top logits from the lm_head's rows (rescore.py), computed by
    the session itself where `in_graph` and it can, else by the rescorer."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # Pinned where onnxruntime has a choice that changes numbers: denormals are kept (its default).
    # The rest is fixed by the graph: fp32 GEMMs pick an AVX2 or AVX-512 kernel by CPU (the same
    # arithmetic, other summation order) and the fast MatMulNBits kernels a VNNI or AMX path;
    # the build records their distance from the exact ones with the CPU it ran on.
    opts.add_session_config_entry("session.set_denormal_as_zero", "0")
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    path = artifact_file(directory, manifest["target"].get("files", {}).get("model"), "its model")
    check_external_data(path, Path(directory))  # before anything reads the weights
    providers = ["CPUExecutionProvider"]
    if accuracy_level is None and not rescore:
        return _session(ort, str(path), opts, providers, path), None
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a corrupt protobuf: onnx raises its own DecodeError
        raise ArtifactError(
            f"{path} is not a readable ONNX model ({reason(exc)}); rebuild it."
        ) from None
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = a.i if accuracy_level is None else accuracy_level
    vocab = int(manifest["model"]["vocab_size"])
    rescorer = LmHeadRescorer.attach(model, path.parent, vocab, in_graph) if rescore else None
    folder = "session.model_external_initializers_file_folder_path"
    opts.add_session_config_entry(folder, str(path.parent))
    return _session(ort, model.SerializeToString(), opts, providers, path), rescorer


def _session(ort, model, opts, providers, path: Path):
    """An onnxruntime session; a model it cannot load is an ArtifactError, not a crash."""
    try:
        return ort.InferenceSession(model, opts, providers=providers)
    except Exception as exc:  # onnxruntime's Fail, InvalidGraph, InvalidProtobuf, NoSuchFile…
        raise ArtifactError(
            f"onnxruntime cannot load {path} ({reason(exc)}); rebuild the artifact."
        ) from None


def _exact_prompts_asked() -> bool:
    import os

    return os.environ.get("LLMC_EXACT_PROMPTS") == "1"


def fast_prompts() -> bool:
    """Whether this CPU runs int8-activation prompts fast (int8 dot products);
    LLMC_EXACT_PROMPTS=1 keeps a second, exact session for every prompt anyway."""
    from llmc.host import int8_dot

    return not _exact_prompts_asked() and int8_dot()


class Model(BaseModel):
    """An ONNX artifact loaded on onnxruntime: its sessions, shared by every sequence (an
    onnxruntime session runs concurrent calls); `sequence()` gives one of the artifact's KV mode.

    `exact`: quantized matmuls dequantize their weights and multiply in fp32 on every step
    (verification: the numbers of the llmc graph); otherwise decode steps quantize activations
    to int8 (onnxruntime's fast kernels), and so do prompts where the CPU has int8 dot products
    (`fast_prompts`: one session, one copy of the weights); elsewhere prompts of more than
    `fast_prompt` tokens run on a second, exact session (faster there for many rows)."""

    spins = True
    rescore_in_graph = True  # the fast session corrects its own top logits where it can
    short_extend = SHORT_EXTEND  # what its sequences keep bindings for
    session_config: ClassVar[dict[str, str]] = {}  # onnxruntime session config entries

    def __init__(self, directory, manifest: dict, options: SessionOptions | None = None):
        super().__init__(directory, manifest, options)
        threads, exact = self.options.threads, self.options.exact
        quantized = bool(manifest.get("quantization"))
        fast = quantized and not exact
        self.fast_prompts = fast and fast_prompts()
        self.fast_prompt = 0 if _exact_prompts_asked() else FAST_PROMPT
        if fast:
            partly = FAST_KERNELS if self.fast_prompt else EXACT_PROMPTS
            self.fast_kernels = FAST_EVERY_STEP if self.fast_prompts else partly
        else:
            self.fast_kernels = None
        spin = self.options.spin
        config = self.session_config
        level = 0 if exact and quantized else None
        self.decode_session, self.lm_head_rows = _open(
            directory, manifest, threads, level, fast, spin, config, self.rescore_in_graph
        )
        # what the runtime must rescore itself: nothing where the session does (in_graph)
        rows = self.lm_head_rows
        self.rescore = None if rows is None or rows.in_graph else rows
        self.prefill_session = self.decode_session
        exact_prompts = quantized and not self.fast_prompts
        self.chunk = EXACT_PREFILL_CHUNK if exact_prompts else PREFILL_CHUNK
        # Exact quantized steps dequantize every weight into scratch on each call (113 MB for
        # SmolLM2's lm_head alone): one at a time, so that concurrent sequences do not each hold
        # that scratch (four int8 SmolLM2 prompts at once: peak RSS 1.56x one's, 1.0x in turn).
        self.exact_steps = threading.Lock() if exact_prompts else contextlib.nullcontext()
        if fast and not self.fast_prompts:
            self.prefill_session, _ = _open(
                directory, manifest, threads, 0, spin=spin, config=config
            )
        self.inputs = {i.name for i in self.decode_session.get_inputs()}
        outputs = {o.name: o.shape for o in self.decode_session.get_outputs()}
        self.check_io(self.inputs, outputs, "its ONNX model")
        self.last_only = self.io.logits is Logits.LAST  # --compat builds, and older ones

    def sequence(self) -> Sequence:
        if self.io.kv_mode is KVMode.RECURRENT:
            from llmc.runtime.recurrent import RecurrentSequence

            return RecurrentSequence(
                self, lambda feeds, names: self.run(self.decode_session, names, feeds)
            )
        if self.io.kv_mode is KVMode.SHARED:
            return SharedKVSequence(self)
        return ConcatKVSequence(self)

    def session_for(self, tokens: int, live: bool, join: bool = False, total: int = 0):
        """The session of a step of `tokens` new tokens a row (`total` in all rows) on a live
        cache or a fresh one, and its lm_head rescorer: short steps on a live cache run on the
        decode kernels, and so do the prompts of rows joining a running batch (`join`) and short
        fresh prompts (FAST_PROMPT) on the fast kernels."""
        if (live and tokens <= SHORT_EXTEND) or self.fast_prompts:
            return self.decode_session, self.rescore
        if self.lm_head_rows is not None and (
            (join and tokens <= FAST_JOIN) or (not live and (total or tokens) <= self.fast_prompt)
        ):
            return self.decode_session, self.rescore
        return self.prefill_session, None

    def run(self, sess, *args):
        """`sess.run(*args)`, or run_with_iobinding for a binding; exact quantized ones in turn."""
        run = sess.run_with_iobinding if len(args) == 1 else sess.run
        if sess is self.prefill_session and not self.fast_prompts:
            with self.exact_steps:
                return run(*args)
        return run(*args)


class ConcatKVSequence(ConcatRows, Sequence):
    """Concat-mode KV cache: the runtime keeps past tensors and feeds them back each step."""

    def __init__(self, model: Model):
        super().__init__(model)
        self._start_concat(model)

    def _extend(self, ids: np.ndarray, mask: np.ndarray | None, last_only: bool) -> np.ndarray:
        m = self.model
        live = self._past is not None
        feeds = step_feeds(self._positions, ids, mask, all_positions=not last_only)
        if not live:
            self._past = self._empty_past(ids.shape[0])
        feeds = {k: v for k, v in feeds.items() if k in m.inputs}
        feeds.update(zip(m.io.past_inputs, self._past, strict=True))
        sess, rescore = m.session_for(ids.shape[1], live, total=ids.size)
        names = ["logits", *m.io.present_outputs] + ([rescore.output] if rescore else [])
        logits, *present = m.run(sess, names, feeds)
        if last_only:
            logits = logits[:, -1:]
        if rescore:
            rescore_positions(rescore, logits, present.pop())
        self._past = present  # [B, KVH, T, D] each
        return logits  # [B, 1 or S, V]
