"""Runtime model and sequences of AOTInductor packages (this target's runtime is torch).

The `Model` loads the `.pt2` package once (its weights and compiled kernels); every sequence
calls it. Sequences keep the shared-mode KV cache in slots (runtime/slots.py), one [slots, KV
heads, capacity, D] torch tensor per layer and kind. The compiled graph is functional: a step
returns each layer's cache with the new positions written; a step over every slot keeps the
returned tensors as the cache (no copy), a step over some slots (a prompt row, a joining row)
copies them back into its slots.
"""

from __future__ import annotations

import threading

import numpy as np

from llmc.artifact_checks import check_native, reason
from llmc.errors import ArtifactError
from llmc.runtime.session import Model as BaseModel
from llmc.runtime.session import Sequence, SessionOptions
from llmc.runtime.slots import SlotSequence


class Model(BaseModel):
    """An AOTInductor package loaded on its device, shared by every sequence."""

    def __init__(self, directory, manifest: dict, options: SessionOptions | None = None):
        import torch
        import torch._inductor

        super().__init__(directory, manifest, options)
        target = manifest["target"]
        self.device = torch.device(target.get("device", "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ArtifactError(
                f"{directory} was compiled for CUDA and no GPU is visible here; rebuild it "
                "here with `llmc build --target inductor` (a CPU package)."
            )
        if self.options.threads:
            torch.set_num_threads(self.options.threads)  # torch's pool: one per process
        self.inputs = target["inputs"]
        # native code (compiled kernels it extracts and dlopens): only with a matching checksum
        package = check_native(
            directory, manifest, target.get("files", {}).get("model"), "its AOTInductor package"
        )
        try:
            self.runner = torch._inductor.aoti_load_package(str(package))
        except Exception as exc:  # a package torch cannot open
            raise ArtifactError(
                f"torch cannot load {package} ({reason(exc)}); rebuild the artifact."
            ) from None
        self.lock = threading.Lock()  # one package: steps of concurrent sequences in turn

    def run(self, feeds: dict, past: list):
        """One step: the graph's inputs by name and the past buffers -> (logits, presents)."""
        import torch

        args = [feeds[name] for name in self.inputs if name in feeds]
        with self.lock, torch.no_grad():  # not inference_mode: the sequence edits the outputs
            out = self.runner(*args, *past)
        return out[0], list(out[1:])

    def sequence(self) -> Sequence:
        if self.io.recurrent:
            from llmc.runtime.recurrent import RecurrentSequence

            return RecurrentSequence(self, self.run_step)
        return SharedSequence(self)

    def run_step(self, feeds: dict, names: list) -> list[np.ndarray]:
        """One step of a recurrent graph: every input by name (its state included) -> the
        outputs `names` (logits, then the next state), as numpy."""
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.inputs if n in feeds]
        with self.lock, torch.no_grad():
            out = self.runner(*[a.to(self.device) for a in args])
        return [t.float().cpu().numpy() for t in out[: len(names)]]


class SharedSequence(SlotSequence):
    """Shared-mode KV cache kept as torch tensors on the model's device; see the module's
    docstring."""

    def __init__(self, model: Model):
        super().__init__(model)
        cache = model.io.cache
        self._geometry = (cache.kv_heads, cache.head_dim)

    def _resize(self, slots: int, capacity: int, live: int, held: int) -> None:
        import torch

        heads, dim = self._geometry
        fresh = []
        for old in self._buffers or [None] * len(self.model.io.past_inputs):
            new = torch.zeros((slots, heads, capacity, dim), device=self.model.device)
            if old is not None and live and held:
                new[:live, :, :held] = old[:live, :, :held]
            fresh.append(new)
        self._buffers = fresh

    def _run(self, first: int, ids: np.ndarray, start: np.ndarray, last_only: bool) -> np.ndarray:
        """ids [B, S] for slots first.., after `start` [B] tokens -> logits."""
        import torch

        b, s = ids.shape
        device = self.model.device
        positions = start[:, None] + np.arange(s)
        index = np.array([s - 1]) if last_only else np.arange(s)
        feeds = {
            "input_ids": torch.from_numpy(np.ascontiguousarray(ids, np.int64)).to(device),
            "position_ids": torch.from_numpy(positions.astype(np.int64)).to(device),
            "seqlens_k": torch.from_numpy((start + s - 1).astype(np.int32)).to(device),
            "logits_index": torch.from_numpy(index.astype(np.int64)).to(device),
        }
        whole = first == 0 and b == self._slots
        past = self._buffers if whole else [t[first : first + b] for t in self._buffers]
        logits, present = self.model.run(feeds, past)
        if whole:
            self._buffers = present
        else:
            for buffer, new in zip(self._buffers, present, strict=True):
                buffer[first : first + b].copy_(new)
        return logits.float().cpu().numpy()

    def _compact(self, keep: np.ndarray) -> None:
        import torch

        index = torch.from_numpy(keep.astype(np.int64)).to(self.model.device)
        for buffer in self._buffers:
            buffer[: len(index)] = buffer[index]
