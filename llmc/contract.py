"""The I/O and KV-cache contract of a traced graph and of an artifact (torch-free, typed).

The tracer creates an `IOContract`, passes change it through its methods, the manifest stores it
through `to_manifest` and every session reads it back through `IOContract.from_manifest`: the
names, dtypes, cache geometry and logits mode are decided once and parsed once.

Tensor names (DESIGN.md, "KV-cache contract"): inputs `input_ids`, `position_ids`, then
`attention_mask` (concat and stateful) or `seqlens_k` (shared), `logits_index` when the graph
selects logit positions, `beam_idx` (stateful), `past_key_values.{i}.key|value`; outputs
`logits`, `present.{i}.key|value`. Cache layout [batch, kv_heads, seq, head_dim].

A state-space model (Mamba) has a recurrent state instead (`recurrent` mode): inputs `input_ids`,
`attention_mask` [batch, seq] (this step's tokens only: 0 on left padding), `logits_index`,
`past_state.{i}.conv|ssm`; outputs `logits`, `present.{i}.conv|ssm`, of fixed size whatever the
context ([batch, channels, conv_kernel - 1] and [batch, channels, state_size]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

from llmc.errors import ArtifactError

KV_LAYOUT = "[batch, kv_heads, seq, head_dim]"


class KVMode(str, Enum):
    """Who owns the KV cache and how a step updates it."""

    CONCAT = "concat"  # past in, present = past ++ new out; the runtime feeds it back
    SHARED = "shared"  # one buffer per layer bound as past and present, written in place
    STATEFUL = "stateful"  # the compiled model holds the cache as state (OpenVINO)
    RECURRENT = "recurrent"  # a fixed-size recurrent state in, the next one out (Mamba)

    @property
    def seq_info(self) -> str:
        """The input that tells a step where each row is."""
        return "seqlens_k" if self is KVMode.SHARED else "attention_mask"

    @property
    def runtime_owns_cache(self) -> bool:
        return self is not KVMode.STATEFUL


class Logits(str, Enum):
    """Which positions a step computes logits for."""

    ALL = "all"  # every position of the step
    SELECTED = "selected"  # the positions a `logits_index` input names (prune_lm_head)
    LAST = "last"  # the last position only (artifacts from before logits_index)


@dataclass(frozen=True)
class CacheGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    max_context: int
    dtype: str = "float32"

    def names(self) -> tuple[list[str], list[str]]:
        """(past input names, present output names), key then value per layer."""
        return _io_names(self.layers, "past_key_values", ("key", "value"))


def _io_names(layers: int, past: str, kinds: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """`{past}.{i}.{kind}` inputs and `present.{i}.{kind}` outputs, every kind per layer."""
    pairs = [(i, kind) for i in range(layers) for kind in kinds]
    return [f"{past}.{i}.{k}" for i, k in pairs], [f"present.{i}.{k}" for i, k in pairs]


@dataclass(frozen=True)
class StateGeometry:
    """The recurrent state of a state-space model, per layer and row: a convolution state
    [conv_channels, conv_width] and an SSM state [channels, state_size]. `step_tokens`: the most
    positions one call of the graph takes (the runtime feeds longer prompts in chunks)."""

    layers: int
    channels: int
    conv_channels: int
    conv_width: int
    state_size: int
    max_context: int
    step_tokens: int
    dtype: str = "float32"

    def names(self) -> tuple[list[str], list[str]]:
        """(past input names, present output names), conv then ssm per layer."""
        return _io_names(self.layers, "past_state", ("conv", "ssm"))

    def shapes(self, rows: int) -> list[tuple[int, int, int]]:
        """The shape of each past input, in names() order."""
        conv = (rows, self.conv_channels, self.conv_width)
        return [conv, (rows, self.channels, self.state_size)] * self.layers

    @property
    def row_bytes(self) -> int:
        """Bytes of state one row holds, whatever its context."""
        per_layer = self.conv_channels * self.conv_width + self.channels * self.state_size
        return self.layers * per_layer * _itemsize(self.dtype)

    def to_manifest(self) -> dict:
        return dataclasses.asdict(self)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


_DTYPES = {
    "input_ids": "int64",
    "position_ids": "int64",
    "attention_mask": "int64",
    "seqlens_k": "int32",
    "logits_index": "int64",
    "beam_idx": "int32",
    "logits": "float32",
}


@dataclass(frozen=True)
class IOContract:
    cache: CacheGeometry | StateGeometry
    kv_mode: KVMode = KVMode.CONCAT
    logits: Logits = Logits.ALL
    logits_index: bool = False  # the graph takes a `logits_index` input
    extra_inputs: tuple[str, ...] = ()  # inputs a target adds (OpenVINO's beam_idx)
    unused: tuple[str, ...] = ()  # inputs the emitted graph dropped (nothing read them)
    # shared mode fed an `attention_mask` [B, T] instead of `seqlens_k`, which the graph computes
    # (onnxruntime-genai's convention: llmc build --compat onnxruntime-genai)
    mask_input: bool = False

    @property
    def past_inputs(self) -> list[str]:
        return self.cache.names()[0] if self.kv_mode.runtime_owns_cache else []

    @property
    def present_outputs(self) -> list[str]:
        return self.cache.names()[1] if self.kv_mode.runtime_owns_cache else []

    @property
    def recurrent(self) -> bool:
        """A recurrent state (Mamba), not a KV cache."""
        return isinstance(self.cache, StateGeometry)

    @property
    def seq_info(self) -> str:
        """The input that tells a step where each row is."""
        return "attention_mask" if self.mask_input else self.kv_mode.seq_info

    @property
    def inputs(self) -> list[str]:
        index = ["logits_index"] if self.logits_index else []
        positions = [] if self.recurrent else ["position_ids"]
        head = ["input_ids", *positions, self.seq_info, *index]
        names = [*head, *self.extra_inputs, *self.past_inputs]
        return [n for n in names if n not in self.unused]

    @property
    def outputs(self) -> list[str]:
        return ["logits", *self.present_outputs]

    @property
    def max_context(self) -> int:
        return self.cache.max_context

    def dtype(self, name: str) -> str:
        return self.cache.dtype if name.startswith(("past_", "present.")) else _DTYPES[name]

    # -- changes (passes and targets) ---------------------------------------------------------
    def with_logits(self, logits: Logits) -> IOContract:
        return dataclasses.replace(self, logits=Logits(logits))

    def without_inputs(self, names) -> IOContract:
        """The emitted graph does not take `names` (its exporter dropped inputs nothing read)."""
        dropped = sorted(set(names) & set(self.inputs))
        return dataclasses.replace(self, unused=(*self.unused, *dropped))

    def last_position_only(self) -> IOContract:
        """The graph selects the last position itself (no `logits_index` input): what a runtime
        that feeds only its own inputs needs (llmc build --compat)."""
        return dataclasses.replace(self, logits_index=False, logits=Logits.LAST)

    def with_mask_input(self) -> IOContract:
        """A shared-mode graph that takes `attention_mask` and computes `seqlens_k` inside."""
        return dataclasses.replace(self, mask_input=True)

    def stateful(self, extra_inputs: tuple[str, ...] = ("beam_idx",)) -> IOContract:
        """The cache moved into the compiled model; `extra_inputs` are the target's own."""
        return dataclasses.replace(self, kv_mode=KVMode.STATEFUL, extra_inputs=extra_inputs)

    # -- the manifest's "io" entry ------------------------------------------------------------
    def to_manifest(self) -> dict:
        if self.recurrent:
            cache = {
                "kv_mode": self.kv_mode.value,
                "state_geometry": self.cache.to_manifest(),
                "state_layout": "[batch, conv_channels, conv_kernel - 1], [batch, channels, state]",
            }
        else:
            cache = {
                "kv_dtype": self.cache.dtype,
                "kv_layout": KV_LAYOUT,
                "kv_mode": self.kv_mode.value,
                "kv_geometry": {
                    "layers": self.cache.layers,
                    "kv_heads": self.cache.kv_heads,
                    "head_dim": self.cache.head_dim,
                },
            }
        return {
            "inputs": self.inputs,
            "outputs": self.outputs,
            "past_inputs": self.past_inputs,
            "present_outputs": self.present_outputs,
            "dtypes": {n: self.dtype(n) for n in [*self.inputs, "logits"] if n in _DTYPES},
            **cache,
            "logits": self.logits.value,
            "max_context": self.cache.max_context,
        }

    @classmethod
    def from_manifest(cls, manifest: dict) -> IOContract:
        """The contract of an artifact's manifest (also of artifacts written before the
        geometry was stored: it then comes from the model spec)."""
        io, model = manifest.get("io") or {}, manifest.get("model") or {}
        try:
            if "state_geometry" in io:
                return cls._recurrent(io)
            geometry = io.get("kv_geometry") or {
                "layers": model["num_layers"],
                "kv_heads": model["num_kv_heads"],
                "head_dim": model["head_dim"],
            }
            cache = CacheGeometry(
                int(geometry["layers"]),
                int(geometry["kv_heads"]),
                int(geometry["head_dim"]),
                int(io["max_context"]),
                io.get("kv_dtype", "float32"),
            )
            inputs = io.get("inputs", [])
            mode = KVMode(io.get("kv_mode", "concat"))
            contract = cls(
                cache,
                mode,
                Logits(io.get("logits", "all")),
                logits_index="logits_index" in inputs,
                extra_inputs=tuple(n for n in inputs if n == "beam_idx"),
                mask_input=mode is KVMode.SHARED and "attention_mask" in inputs,
            )
            if inputs:
                contract = contract.without_inputs(set(contract.inputs) - set(inputs))
        except (KeyError, ValueError, TypeError) as exc:
            raise ArtifactError(
                f"the manifest's I/O contract is incomplete or unknown ({exc}); rebuild the "
                "artifact with this llmc."
            ) from None
        return contract

    @classmethod
    def _recurrent(cls, io: dict) -> IOContract:
        geometry = io["state_geometry"]
        fields = {f.name for f in dataclasses.fields(StateGeometry)}
        state = StateGeometry(**{k: v for k, v in geometry.items() if k in fields})
        inputs = io.get("inputs", [])
        contract = cls(
            state,
            KVMode(io["kv_mode"]),
            Logits(io.get("logits", "all")),
            logits_index="logits_index" in inputs,
        )
        return contract.without_inputs(set(contract.inputs) - set(inputs)) if inputs else contract
