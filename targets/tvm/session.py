"""Runtime model and sequences for TVM artifacts on TVM's Relax VM (numpy in and out; no torch).

The `Model` loads the compiled library and reads the weights, saved in the layout the kernels
read, into one buffer that TVM uses as it is. Each sequence has its own VM (a VM's registers are
per call stack, not shared between threads) over the model's packed weights, and keeps its KV
cache in one of two modes:
- `shared` (the default pipeline): one [slots, KV heads, capacity, D] buffer per layer and kind,
  written in place by the step, through views of the slots a step runs on; the slots' bookkeeping
  (prefill row by row, joins, compaction, growth) is runtime/slots.py's.
- `concat` (a model whose attention stays its own, or `--passes -rewire_kv_cache`): the runtime
  feeds the present tensors back as the next step's past, left-padded (PaddedRows).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmc.artifact_checks import artifact_file, check_native, is_int, reason
from llmc.contract import KVMode
from llmc.errors import ArtifactError
from llmc.runtime.padded import ConcatRows
from llmc.runtime.session import Model as BaseModel
from llmc.runtime.session import Sequence, SessionOptions
from llmc.runtime.slots import SlotSequence
from llmc.targets.base import step_feeds

ALIGN = 64  # bytes: what TVM's kernels assume of a tensor's address


def _tensor(array: np.ndarray):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(array))


def _check_host(directory, manifest: dict) -> None:
    """Refuse a library compiled for another CPU (its vector instructions may not exist here)."""
    import tvm
    from tvm.target import codegen

    built = manifest["target"].get("cpu")
    here = codegen.llvm_get_system_cpu()
    if built and built != here:
        raise ArtifactError(
            f"{directory} was compiled for the CPU {built!r} and this one is {here!r}; "
            "rebuild it here with `llmc build --target tvm`."
        )
    built_tvm = manifest.get("toolchain", {}).get("tvm")
    if built_tvm and built_tvm != tvm.__version__:
        raise ArtifactError(
            f"{directory} was compiled with TVM {built_tvm} but {tvm.__version__} is installed; "
            f"install apache-tvm=={built_tvm} or rebuild it."
        )


def _configure_threads(threads: int | None) -> None:
    """Workers of TVM's thread pools (one per calling thread, sized when it first runs a
    parallel loop, from TVM_NUM_THREADS): `threads`, else one per core of this process. TVM's
    own default is half the cores (it assumes two hyperthreads per core): one core here, 1.45x
    slower decode on SmolLM2. A TVM_NUM_THREADS set by the user is kept."""
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def _check_index(path: Path, index) -> None:
    """Every weight of the index inside the params file, of a shape and dtype numpy reads."""
    size = path.stat().st_size
    for e in index if isinstance(index, list) else [None]:
        try:
            shape, offset = tuple(e["shape"]), e["offset"]
            ok = is_int(offset) and offset >= 0 and all(is_int(n) and n >= 0 for n in shape)
            nbytes = int(np.prod(shape, dtype=object)) * np.dtype(e["dtype"]).itemsize
            ok = ok and offset + nbytes <= size
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ArtifactError(
                f"{path.parent}/llmc.json has a malformed param_index (a weight outside "
                f"{path.name}); rebuild the artifact."
            )


def _load_params(path: Path, index: list[dict]) -> list:
    """The packed weights read in one go into one 64-byte-aligned anonymous buffer, handed to
    TVM without a copy (peak memory: the weights once). Anonymous, not a mapping of the file:
    `rt.load` then backs it with huge pages, which a decode step that streams every weight
    needs (from a file mapping, with 4 KiB pages, SmolLM2's step took 15.7 ms instead of 12.6)."""
    import tvm

    size = path.stat().st_size
    raw = np.empty(size + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    buffer = raw[start : start + size]
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < size:
            done += f.readinto(memoryview(buffer[done:]))
    return [
        tvm.runtime.from_dlpack(
            np.ndarray(tuple(e["shape"]), np.dtype(e["dtype"]), buffer, e["offset"])
        )
        for e in index
    ]


class Model(BaseModel):
    """A TVM artifact: the compiled module and its packed weights, shared by every sequence."""

    def __init__(self, directory, manifest: dict, options: SessionOptions | None = None):
        import tvm

        super().__init__(directory, manifest, options)
        _check_host(directory, manifest)
        _configure_threads(self.options.threads)
        files = manifest["target"]
        # native code: loaded only when its checksum matches the manifest's
        library = check_native(directory, manifest, files.get("library"), "its TVM library")
        params = artifact_file(directory, files.get("params"), "its weights")
        _check_index(params, files.get("param_index"))
        try:
            self.library = tvm.runtime.load_module(str(library))
        except Exception as exc:  # TVM's own error types
            raise ArtifactError(
                f"TVM cannot load {library} ({reason(exc)}); rebuild the artifact."
            ) from None
        self.device = tvm.cpu()
        self.params = _load_params(params, files["param_index"])

    def vm(self):
        """A VM of its own for a sequence, over the shared library and weights."""
        from tvm import relax

        return relax.VirtualMachine(self.library, self.device)["main"]

    def sequence(self) -> Sequence:
        if self.io.recurrent:
            return self._recurrent_sequence()
        if self.io.kv_mode is KVMode.SHARED:
            return SharedSequence(self)
        return ConcatSequence(self)

    def _recurrent_sequence(self) -> Sequence:
        """A state-space model's sequence (runtime/recurrent.py) on a VM of its own."""
        from llmc.runtime.recurrent import RecurrentSequence

        main = self.vm()

        def run(feeds: dict, names: list) -> list[np.ndarray]:
            inputs = [feeds[name] for name in self.io.inputs if name in feeds]
            out = main(*map(_tensor, inputs), *self.params)
            return [out[i].numpy() for i in range(len(names))]

        return RecurrentSequence(self, run)


class SharedSequence(SlotSequence):
    """Shared KV buffers written in place; see the module's docstring."""

    def __init__(self, model: Model):
        super().__init__(model)
        self._main = model.vm()
        cache = model.io.cache
        self._geometry = (cache.kv_heads, cache.head_dim, np.dtype(cache.dtype))
        self._view_cache: dict[tuple[int, int], list] = {}  # (first slot, rows) -> views

    # -- buffers -------------------------------------------------------------------------------
    def _resize(self, slots: int, capacity: int, live: int, held: int) -> None:
        heads, dim, dtype = self._geometry
        fresh = []
        for old in self._buffers or [None] * len(self.model.io.past_inputs):
            new = np.zeros((slots, heads, capacity, dim), dtype)
            if old is not None and live and held:
                new[:live, :, :held] = old.numpy()[:live, :, :held]
            fresh.append(_tensor(new))
        self._buffers = fresh
        self._view_cache = {}

    def _views(self, first: int, rows: int) -> list:
        """Each buffer's slots first..first+rows as a [rows, KVH, capacity, D] tensor (kept
        until the buffers change: making 60 views costs a decode step 0.27 ms)."""
        key = (first, rows)
        if key in self._view_cache:
            return self._view_cache[key]
        out = []
        for buffer in self._buffers:
            _, heads, capacity, dim = buffer.shape
            row_bytes = heads * capacity * dim * np.dtype(buffer.dtype).itemsize
            shape = (rows, heads, capacity, dim)
            out.append(buffer._create_view(shape, relative_byte_offset=first * row_bytes))
        self._view_cache[key] = out
        return out

    # -- steps ---------------------------------------------------------------------------------
    def _run(self, first: int, ids: np.ndarray, start: np.ndarray, last_only: bool) -> np.ndarray:
        """ids [B, S] for rows first.. of the buffers, after `start` [B] tokens -> logits."""
        s = ids.shape[1]
        positions = start[:, None] + np.arange(s)
        index = np.array([s - 1]) if last_only else np.arange(s)
        out = self._main(
            _tensor(ids),
            _tensor(positions.astype(np.int64)),
            _tensor((start + s - 1).astype(np.int32)),
            _tensor(index.astype(np.int64)),
            *self._views(first, ids.shape[0]),
            *self.model.params,
        )
        return out[0].numpy()

    def _release(self) -> None:
        super()._release()
        self._view_cache = {}

    def _compact(self, keep: np.ndarray) -> None:
        for new, old in enumerate(keep):
            if new != old:
                for dst, src in zip(self._views(new, 1), self._views(int(old), 1), strict=True):
                    src.copyto(dst)


class ConcatSequence(ConcatRows, Sequence):
    """Concat-mode KV cache: the runtime keeps the past tensors and feeds them back each step."""

    def __init__(self, model: Model):
        super().__init__(model)
        self._main = model.vm()
        self._start_concat(model)

    def _extend(self, ids: np.ndarray, mask: np.ndarray | None, last_only: bool) -> np.ndarray:
        io = self.model.io
        feeds = step_feeds(self._positions, ids, mask, all_positions=not last_only)
        if self._past is None:
            self._past = self._empty_past(ids.shape[0])
        inputs = [feeds[name] for name in io.inputs if name in feeds]
        out = self._main(*map(_tensor, inputs), *map(_tensor, self._past), *self.model.params)
        self._past = [out[i].numpy() for i in range(1, len(io.present_outputs) + 1)]
        return out[0].numpy()
