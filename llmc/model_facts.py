"""What a model is, read from its config without loading weights: the architecture features
`llmc build --dry-run` shows and the parameter counts its estimates use (llmc/dryrun.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from llmc.errors import LlmcError, SourceError, UnsupportedModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFacts:
    spec: object  # compiler.spec.ModelSpec (KV geometry from one meta-device step when it runs)
    config_from: str  # where the config was read: "config.json", "GGUF metadata", ...
    params: int  # unique parameters (a tied lm_head counted once)
    linear_params: int  # linear weights other than the lm_head: what --quant quantizes to its bits
    head_params: int  # the lm_head weight (8 bits when quantized, its own codes even when tied)
    embedding_params: int  # embedding tables (8 bits when quantized)
    tied: bool
    features: tuple[str, ...] = field(default=())
    cached_gguf: bool | None = None  # GGUF: whether its dequantized fp32 copy is in the llmc cache

    @property
    def other_params(self) -> int:
        """Norms, biases and whatever else stays fp32."""
        shared = self.head_params if self.tied else 0
        rest = self.params + shared - self.linear_params - self.head_params
        return max(0, rest - self.embedding_params)


def read_config(source) -> tuple[object, str, bool | None]:
    """The transformers config of a resolved source, read without weights: (config, where it was
    read, whether a GGUF's dequantized copy is cached)."""
    import transformers

    if source.kind == "tiny":
        from llmc.compiler import tiny

        spec = tiny.TINY[source.ref.split(":", 1)[1]]
        return getattr(transformers, spec.config_class)(**spec.kwargs), "tiny registry", None
    if source.kind in ("gguf", "default"):
        return _gguf_config(Path(source.ref))
    try:
        config = transformers.AutoConfig.from_pretrained(source.ref)
    except OSError as exc:
        raise SourceError(
            f"{source.ref}: its config could not be read ({type(exc).__name__}); pass a local "
            "model directory, or download the hub model first."
        ) from exc
    except ValueError as exc:
        raise UnsupportedModelError(
            f"{source.ref}: transformers {transformers.__version__} does not know this "
            "architecture; upgrade transformers or pass another model."
        ) from exc
    return config, "config.json", None


def _gguf_config(path: Path) -> tuple[object, str, bool]:
    """The config from the GGUF's metadata keys (transformers' own key table, milliseconds)
    instead of transformers' full GGUF parse (seconds: it reads the whole vocabulary)."""

    from llmc.compiler import sources

    cached = (
        sources.cache_dir() / "gguf" / sources.file_sha256(path)[:32] / "config.json"
    ).is_file()
    try:
        return _config_from_gguf_metadata(path), "GGUF metadata", cached
    except Exception as exc:  # an architecture the table lacks: transformers' reader decides
        log.debug("GGUF metadata of %s not mapped (%s); full parse", path, exc)
    return sources.gguf_config(path), "GGUF (transformers' parser)", cached


def _config_from_gguf_metadata(path: Path):
    import transformers
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf import read_gguf_metadata

    metadata, tensors = read_gguf_metadata(str(path))
    arch = metadata["general.architecture"]
    table = GGUF_CONFIG_MAPPING[arch]
    kwargs = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}))
    for key, name in table.items():
        value = metadata.get(f"{arch}.{key}")
        if value is not None and name not in (None, -1):
            kwargs[name] = value
    kwargs.setdefault("vocab_size", metadata.get("tokenizer.ggml.tokens"))  # its length
    kwargs["tie_word_embeddings"] = "output.weight" not in tensors
    for ours, theirs in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        if (value := metadata.get(f"tokenizer.ggml.{theirs}_token_id")) is not None:
            kwargs[f"{ours}_token_id"] = value
    return transformers.AutoConfig.for_model(arch, **kwargs)


def model_facts(source, kv_from_step: bool = True) -> ModelFacts:
    """Read the config, build the model on the meta device (no memory, no weights) and count its
    parameters; `kv_from_step`: one meta-device step reads the KV-cache geometry (as the build's
    ModelSpec.from_model does), else the config's."""
    import torch
    import transformers

    from llmc.compiler import sources
    from llmc.compiler.spec import ModelSpec

    config, config_from, cached = read_config(source)
    sources.check_architecture(config)  # refuses what the build refuses
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise LlmcError(
            f"{source.ref}: transformers cannot build this {config.model_type} model from its "
            f"config ({type(exc).__name__}: {exc})."
        ) from exc
    spec = ModelSpec.from_config(config)
    if kv_from_step:
        try:
            with torch.device("meta"):
                spec = ModelSpec.from_model(model)
        except Exception as exc:  # a model whose step needs real data: the config's geometry
            log.debug("meta-device step failed (%s); KV geometry from the config", exc)
    counts = _parameter_counts(model)
    return ModelFacts(
        spec=spec,
        config_from=config_from,
        features=tuple(features(config, model, spec)),
        cached_gguf=cached,
        **counts,
    )


def _is_linear(module) -> bool:
    import torch

    w = getattr(module, "weight", None)
    conv1d = type(module).__name__ == "Conv1D"  # GPT-2's linear, stored [in, out]
    return (isinstance(module, torch.nn.Linear) or conv1d) and w is not None and w.dim() == 2


def _parameter_counts(model) -> dict:
    import torch

    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    linear = embedding = 0
    for module in model.modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Embedding):
            embedding += module.weight.numel()
        elif _is_linear(module):
            linear += module.weight.numel()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "linear_params": linear,
        "head_params": head.weight.numel() if head is not None else 0,
        "embedding_params": embedding,
        "tied": tied,
    }


def _first_layer(model, num_layers: int):
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module[0]
    return None


def features(config, model, spec) -> list[str]:
    """The architecture features, from the config's fields and the first decoder layer's modules
    (no model name is looked at)."""
    c = config.get_text_config()
    found = [_attention(spec)]
    found += _positions(c, model, spec)
    window = getattr(c, "sliding_window", None)
    if window and getattr(c, "use_sliding_window", True) is not False:
        types = getattr(c, "layer_types", None) or []
        sliding = sum(t == "sliding_attention" for t in types) if types else spec.num_layers
        if sliding:
            found.append(f"sliding window {window} ({sliding} of {spec.num_layers} layers)")
    for key, what in (
        ("attn_logit_softcapping", "attention"),
        ("final_logit_softcapping", "logit"),
    ):
        if getattr(c, key, None):
            found.append(f"{what} soft-cap {getattr(c, key):g}")
    layer = _first_layer(model, spec.num_layers)
    if layer is not None:
        found += _layer_features(c, layer)
    scales = [
        f"{key} {getattr(c, key):g}"
        for key in (
            *("embedding_multiplier", "residual_multiplier", "attention_multiplier"),
            *("logits_scaling", "logit_scale", "query_pre_attn_scalar"),
        )
        if isinstance(getattr(c, key, None), int | float)
    ]
    if scales:
        found.append("scaling: " + ", ".join(scales))
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    if experts:
        found.append(f"mixture of experts ({experts} experts)")
    found.append("tied embeddings" if spec.tie_word_embeddings else "separate lm_head")
    return found


def _attention(spec) -> str:
    heads, kv = spec.num_heads, spec.num_kv_heads
    if kv == 1 and heads > 1:
        return f"multi-query attention ({heads} query heads, 1 KV head, head dim {spec.head_dim})"
    if kv < heads:
        return f"grouped-query attention ({heads} query / {kv} KV heads, head dim {spec.head_dim})"
    return f"multi-head attention ({heads} heads, head dim {spec.head_dim})"


def _positions(c, model, spec) -> list[str]:
    if getattr(c, "alibi", False):
        return ["ALiBi positions"]
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    theta = (
        rope.get("rope_theta", getattr(c, "rope_theta", None)) if isinstance(rope, dict) else None
    )
    if theta is None:
        learned = any("position" in n or n.endswith("wpe") for n, _ in model.named_modules())
        return ["learned absolute positions"] if learned else ["no rotary embedding"]
    text = f"RoPE θ={theta:g}"
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        factor = rope.get("factor")
        text += f", {kind} scaling" + (f" ×{factor:g}" if factor else "")
    partial = rope.get("partial_rotary_factor") or getattr(c, "partial_rotary_factor", None)
    if partial and partial < 1:
        text += f", partial rotary ({partial:g} of each head)"
    no_rope = getattr(c, "no_rope_layers", None)
    if no_rope and not all(no_rope):
        text += f", on {sum(map(bool, no_rope))} of {spec.num_layers} layers (others NoPE)"
    return [text]


def _layer_features(c, layer) -> list[str]:
    """Norm kind and count, q/k norms, parallel blocks, biased linears and the MLP, from the
    modules of one decoder layer."""
    short = {n: n.rsplit(".", 1)[-1] for n, _ in layer.named_modules() if n}
    modules = dict(layer.named_modules())
    norms = [n for n in short if "norm" in type(modules[n]).__name__.lower()]
    qk = sorted(short[n] for n in norms if short[n][:2] in ("q_", "k_"))
    block = [short[n] for n in norms if short[n] not in qk]
    rms = {"rms" in type(modules[n]).__name__.lower() for n in norms if short[n] in block}
    found = []
    if block:
        kinds = "/".join(
            k for k, on in (("RMSNorm", True in rms), ("LayerNorm", False in rms)) if on
        )
        after = any("post_feedforward" in n for n in block)  # a norm on each block's output
        before = any(n.startswith(("input", "pre_")) for n in block)
        where = (
            ", before and after blocks" if after and before else ", after blocks" if after else ""
        )
        found.append(f"{kinds} ({len(block)} per layer{where})")
    if qk:
        found.append(f"q/k norms ({', '.join(qk)})")
    parallel = getattr(c, "parallel_attn", False) or getattr(c, "use_parallel_residual", False)
    if parallel or len(block) == 1:
        found.append("parallel attention and MLP")
    linears = [n for n in short if _is_linear(modules[n])]
    biased = sorted({short[n] for n in linears if modules[n].bias is not None})
    if biased:
        found.append(f"linear biases ({', '.join(biased)})")
    act = next((getattr(c, k) for k in _ACTIVATIONS if isinstance(getattr(c, k, None), str)), None)
    gated = any("gate" in short[n] for n in linears)
    found.append(f"{'gated ' if gated else ''}MLP ({act or 'activation not in its config'})")
    return found


_ACTIVATIONS = ("hidden_act", "hidden_activation", "activation_function", "activation")
