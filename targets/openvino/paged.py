"""Paged attention for OpenVINO artifacts: the artifact's stateful IR rewritten at load time by
OpenVINO's own SDPA-to-PagedAttention transformation, and a sequence that keeps its rows' KV
cache in fixed-size blocks it hands to the model as inputs (numpy in, numpy out; no torch).

Why: on the stateful IR every shape change costs. A decode step on the dynamic model re-plans
its memory, the static one-token copy of the model needs the state moved into it and back for a
multi-token (speculative verification) step, and rows joining a running batch are prefilled
apart and left-padded into it. The paged model takes a flat list of new tokens from any number of
rows, each with its own past length: a decode step, a verification step of K tokens, a joining
prompt and a rollback (a shorter past length) are all the same call on one compiled model, with
no padding and no state copies. It is the form OpenVINO GenAI's continuous batching runs. Where
memory allows, one row's decode step runs on a copy with static shapes (`paged_decoder`) that
shares the sequence's blocks.

The rewrite: `paged_attention_transformation` replaces each SDPA and its ReadValue/Assign pair by
a PagedAttentionExtension whose inputs include `key_cache.{i}`, `value_cache.{i}` (blocks
[n, KV heads, block, head dim]), `past_lens`, `subsequence_begins`, `block_indices`,
`block_indices_begins` and `max_context_len`; `input_ids` and `position_ids` become flat [T]
and the hidden states [T, 1, H]. llmc's `logits_index` gathers along the token axis, so its
gathers get a reshape to [1, T, H] in front, and the logits come out [1, n, V]."""

from __future__ import annotations

import numpy as np

from llmc.contract import Logits
from llmc.errors import SessionError
from llmc.host import int8_dot
from llmc.runtime.session import Sequence as BaseSequence
from llmc.runtime.session import check_context

# On the fast int8 kernels (dynamic quantization), one-row steps of 2 to VERIFY_TOKENS tokens
# with every position's logits (speculative verification) are padded to VERIFY_TOKENS. The
# dynamic model re-plans every node whenever its input shapes change, and verification steps
# would change them nearly every time: on int8 SmolLM2 here a 2-token step took 18.3 ms after a
# 2-token step and 24.1 ms after a 1-token one; a 16-token step 30.2 ms after a 16-token one,
# 40.7 after a 6-token one. Padded, the model sees the prompt's shape once and then only this
# one (one-token steps run on the static copy): prompt lookup ran 1.18x (copying code) and
# 1.12x (continuing a list) as fast, paired over 3 alternations. At fp32 a long step costs more
# next to a decode step, and padding short drafts did not pay (0.94x copying code, 1.08x the
# list, over 8). A padding position comes after the real ones, so causal attention keeps it out
# of their logits; its keys and values land past the row's length, where the next step writes.
# Without int8 dot products (llmc.host.int8_dot) the plugin does not quantize activations, the
# kernels are fp32's, and steps run unpadded: on a Zen 3 with AVX2 alone a padded step of int8
# SmolLM2 took 47-50 ms (4 decode steps of 12.5 ms) against 25-28 ms for 2-4 tokens unpadded.
VERIFY_TOKENS = 16
SHAPE_INPUTS = (
    "input_ids",
    "position_ids",
    "logits_index",
    "past_lens",
    "subsequence_begins",
    "block_indices",
    "block_indices_begins",
    "max_context_len",
)


def paged_model(loaded, model, wanted: bool | None):
    """The paged-attention form of `model` (None: run the stateful one) for the OpenVINO Model
    `loaded`, where `wanted` allows it and the artifact takes it: not a state-space model, every
    position's logits (not a --compat build), no sliding window (the rewrite does not carry
    llmc's window masks). SessionError where `wanted` is True and it cannot."""
    if wanted is False:
        return None
    why = None
    if loaded.io.recurrent:
        why = "a state-space model has no attention to page"
    elif loaded.io.logits is Logits.LAST:
        why = "it computes logits for the last position only (a --compat build)"
    elif loaded.sliding_window:
        why = "it has a sliding window"
    else:
        paged, why = paged_form(model)
        if paged is not None:
            return paged
    if wanted:
        raise SessionError(f"{loaded.directory} cannot run with paged attention: {why}.")
    return None


def paged_form(model):
    """`model` (an ov.Model of llmc's stateful form, not changed) as a paged-attention model,
    or (None, reason) where the transformation does not take it whole."""
    import openvino.opset13 as ops
    from openvino._offline_transformations import paged_attention_transformation

    paged = model.clone()
    try:
        paged_attention_transformation(paged)
    except Exception as exc:  # OpenVINO's own error: the pattern it rewrites is not there
        return None, f"OpenVINO's paged-attention transformation failed ({exc})"
    names = {p.get_any_name() for p in paged.inputs}
    layers = sum(op.get_type_name() == "PagedAttentionExtension" for op in paged.get_ops())
    caches = sum(n.startswith("key_cache.") for n in names)
    if not layers or caches != layers or not set(SHAPE_INPUTS) <= names:
        return None, f"it gave {layers} paged-attention layers and inputs {sorted(names)}"
    if paged.get_sinks():
        return None, "state is left after the transformation"
    (index,) = [p for p in paged.get_parameters() if "logits_index" in p.output(0).get_names()]
    flat_to_row = ops.constant(np.array([1, -1, 0], np.int64))
    for target in list(index.output(0).get_target_inputs()):
        gather = target.get_node()
        if gather.get_type_name() != "Gather" or target.get_index() != 1:
            return None, f"logits_index feeds a {gather.get_type_name()}"
        hidden = gather.input(0).get_source_output()
        gather.input(0).replace_source_output(ops.reshape(hidden, flat_to_row, True).output(0))
    paged.validate_nodes_and_infer_types()
    return paged, None


def paged_decoder(paged, rows: int):
    """A copy of the paged model reshaped for `rows` rows of one new token each (only the block
    table and the cache blocks stay dynamic): the plugin then plans the step once. SmolLM2 here,
    one row: int8 16.2–16.9 ms a step against 18.0–18.8 on the dynamic model, fp32 about 3%."""
    import openvino as ov

    fixed = {
        "input_ids": [rows],
        "position_ids": [rows],
        "past_lens": [rows],
        "subsequence_begins": [rows + 1],
        "block_indices_begins": [rows + 1],
        "logits_index": [rows],
        "max_context_len": [],
    }
    model = paged.clone()
    names = {p: p.get_any_name() for p in model.inputs}
    model.reshape({p: ov.PartialShape(fixed[n]) for p, n in names.items() if n in fixed})
    return model


class BlockPool:
    """One sequence's KV blocks: a tensor per cache input [capacity, KV heads, block, head dim]
    set on its infer request, grown by doubling (a copy of what is held), with a free list."""

    def __init__(self, compiled, request):
        import openvino as ov

        self._ov, self._requests = ov, [request]
        self._specs = {}
        for port in compiled.inputs:
            name = port.get_any_name()
            if name.startswith(("key_cache.", "value_cache.")):
                dims = [d.get_length() for d in list(port.get_partial_shape())[1:]]
                self._specs[name] = (dims, port.get_element_type())
        # positions per block: the value cache's third dimension (an 8-bit key cache quantized
        # by channel, the plugin's default at bf16, keeps its scales as extra rows of the block)
        self.block = self._specs["value_cache.0"][0][1]
        self.block_bytes = sum(
            int(np.prod(d)) * e.size for d, e in self._specs.values()
        )  # one block of every layer's key and value
        self.capacity = 0
        self._tensors: dict[str, object] = {}
        self._free: list[int] = []

    def attach(self, request) -> None:
        """Give `request` (another compiled form of the model) the same cache tensors."""
        self._requests.append(request)
        for name, tensor in self._tensors.items():
            request.set_tensor(name, tensor)

    def take(self, count: int) -> list[int]:
        if count > len(self._free):
            self._grow(max(2 * self.capacity, self.capacity + count, 4))
        taken, self._free = self._free[:count], self._free[count:]
        return taken

    def give(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    def release(self) -> None:
        """Free the memory (every block must have been given back): the requests hold tensors
        of no blocks, not the old ones."""
        self.capacity, self._free, self._tensors = 0, [], {}
        self._set(0)

    def _grow(self, capacity: int) -> None:
        old, held = self._tensors, self.capacity
        self._set(capacity)
        for name, tensor in old.items():
            self._tensors[name].data[:held] = tensor.data
        self._free.extend(range(held, capacity))
        self.capacity = capacity

    def _set(self, capacity: int) -> None:
        """New tensors of `capacity` blocks for every cache input, on every request."""
        self._tensors = {}
        for name, (dims, element) in self._specs.items():
            tensor = self._ov.Tensor(element, [capacity, *dims])
            self._tensors[name] = tensor
            for request in self._requests:
                request.set_tensor(name, tensor)


class PagedSequence(BaseSequence):
    """Rows on a paged-attention model: each row has its own list of cache blocks and length;
    a step feeds every row's new tokens as one flat list. Rows join (`add`) with their prompt
    alone, leave (`remove`) by giving their blocks back, and roll back (`truncate`) by a
    shorter length (blocks past it are given back)."""

    def __init__(self, model, compiled):
        super().__init__(model)
        self._request = compiled.create_infer_request()
        self._pool = BlockPool(compiled, self._request)
        self._single = None  # the request of the one-row decode model (static_decode)
        # verification steps padded to VERIFY_TOKENS: on the fast int8 kernels only
        self._pads = bool(model.dynamic_quantization) and int8_dot()
        self._blocks: list[list[int]] = []  # per row
        self._held = np.zeros(0, np.int64)  # tokens in each row's cache

    @property
    def extend_sizes(self) -> tuple[int, ...] | None:
        return (VERIFY_TOKENS,) if self._pads else None

    def _reset(self) -> None:
        for blocks in self._blocks:
            self._pool.give(blocks)
        self._blocks, self._held = [], np.zeros(0, np.int64)

    def _release(self) -> None:
        self._pool.release()

    def _lengths(self) -> np.ndarray:
        return self._held.copy()

    def _kv_bytes(self) -> int:
        return sum(map(len, self._blocks)) * self._pool.block_bytes

    def _fit(self, row: int, length: int) -> None:
        """Give row `row` blocks for `length` positions, taking or giving back the difference."""
        need = -(-length // self._pool.block)
        blocks = self._blocks[row]
        if need > len(blocks):
            blocks.extend(self._pool.take(need - len(blocks)))
        elif need < len(blocks):
            self._pool.give(blocks[need:])
            del blocks[need:]

    def _truncate(self, lengths: np.ndarray) -> None:
        for row, length in enumerate(lengths):
            self._fit(row, int(length))
        self._held = lengths.astype(np.int64)

    def _remove(self, keep: np.ndarray) -> None:
        for row in np.setdiff1d(np.arange(len(self._blocks)), keep):
            self._pool.give(self._blocks[row])
        self._blocks = [self._blocks[r] for r in keep]
        self._held = self._held[keep]

    def _add(self, rows: list[np.ndarray]) -> np.ndarray:
        first = len(self._blocks)
        self._blocks += [[] for _ in rows]
        self._held = np.concatenate([self._held, np.zeros(len(rows), np.int64)])
        spans = [(first + i, row) for i, row in enumerate(rows)]
        return self._run(spans, last_only=True)[:, 0]

    def _extend(self, ids: np.ndarray, mask, last_only: bool) -> np.ndarray:
        if not self._blocks:  # a prefill (after a reset): the rows start here
            self._blocks = [[] for _ in range(ids.shape[0])]
            self._held = np.zeros(ids.shape[0], np.int64)
        if mask is None:
            return self._run(list(enumerate(ids)), last_only)
        if not last_only:  # the base class pads prompts only for their last logits
            raise SessionError("a padded prompt gives the logits of its last position only.")
        return self._run([(b, ids[b][mask[b] == 1]) for b in range(ids.shape[0])], True)

    def step(self, last: np.ndarray) -> np.ndarray:
        return self._run(list(enumerate(last[:, None])), True, copy=False)[:, 0]

    def _run(
        self, spans: list[tuple[int, np.ndarray]], last_only: bool, copy: bool = True
    ) -> np.ndarray:
        """One step: each (row, new tokens) after what the row holds -> logits [rows, 1 or S, V]
        of those rows in span order (S: the rows' common number of new tokens); without `copy`,
        a view of the request's output, valid until its next step."""
        counts = np.array([len(t) for _, t in spans], np.int64)
        past = np.array([self._held[r] for r, _ in spans], np.int64)
        ends = past + counts  # what each row holds after the step
        check_context(int(ends.max()), self.max_context)
        per_row = 1 if last_only else int(counts[0])
        fill = self._padding(spans, int(ends[0]), last_only)
        if fill:  # a verification step, padded to VERIFY_TOKENS
            row, tokens = spans[0]
            spans, counts = (
                [(row, np.concatenate([tokens, np.repeat(tokens[-1:], fill)]))],
                [VERIFY_TOKENS],
            )
        fed = past + counts  # what each row's cache is written to
        for (row, _), end in zip(spans, fed, strict=True):
            self._fit(row, int(end))
        begins = np.concatenate([[0], np.cumsum(counts)])
        blocks = [np.asarray(self._blocks[r], np.int32) for r, _ in spans]
        feeds = {
            "input_ids": np.concatenate([t for _, t in spans]).astype(np.int64),
            "position_ids": np.concatenate(
                [np.arange(p, e) for p, e in zip(past, fed, strict=True)]
            ),
            "past_lens": past.astype(np.int32),
            "subsequence_begins": begins.astype(np.int32),
            "block_indices": np.concatenate(blocks),
            "block_indices_begins": np.concatenate(
                [[0], np.cumsum([len(b) for b in blocks])]
            ).astype(np.int32),
            "max_context_len": np.array(int(fed.max()), np.int32),
            "logits_index": (begins[1:] - 1 if last_only else np.arange(begins[-1])).astype(
                np.int64
            ),
        }
        request = self._request
        if len(spans) == 1 and counts[0] == 1 and self.model.static_decode:
            if self._single is None:
                self._single = self.model.decoder(1).create_infer_request()
                self._pool.attach(self._single)
            request = self._single
        held = self._held.copy()
        for (row, _), end in zip(spans, ends, strict=True):
            self._held[row] = end  # before the run: numpy is warm here (see Sequence.step)
        try:
            request.infer(feeds, share_inputs=True)
        except BaseException:
            self._held = held
            raise
        if fill:  # blocks only the padding needed go back
            self._fit(spans[0][0], int(ends[0]))
        logits = request.get_tensor("logits").data[0]  # [n, V]
        logits = logits.reshape(len(spans), -1, logits.shape[-1])[:, :per_row]
        return logits.copy() if copy else logits

    def _padding(self, spans, end: int, last_only: bool) -> int:
        """Tokens to pad this step with: a one-row step of 2 to VERIFY_TOKENS tokens with every
        position's logits, where the context has room (else 0)."""
        tokens = len(spans[0][1])
        if not self._pads or len(spans) > 1 or last_only or not 1 < tokens < VERIFY_TOKENS:
            return 0
        fill = VERIFY_TOKENS - tokens
        return fill if end + fill <= self.max_context else 0
