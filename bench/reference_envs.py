"""The reference engines' environments and models for the benches, and a timing streamer for
OpenVINO GenAI.

onnxruntime-genai (bench/.venv-ref) and OpenVINO GenAI with optimum-intel (bench/.venv-ov) live in
venvs layered over the project's .venv, created on first use, so the project never depends on
them; their models of the same fp32 weights are built once and cached under ~/.cache/llmc/bench.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF_ENV = ROOT / "bench" / ".venv-ref"
OV_ENV = ROOT / "bench" / ".venv-ov"
OG_VERSION = "0.18.0"
OV_VERSION = "2026.4.0"  # openvino, openvino-genai and openvino-tokenizers (same release)
OV_PACKAGES = [  # installed over the project's .venv, whose CPU torch they must not replace
    ["--no-deps", "optimum-intel==2.2.0", "optimum~=2.3.0"],
    [
        "transformers>=5.0,<5.6",
        "kernels==0.12.3",  # the project's newer one rejects transformers 5.5's kernel mapping
        "nncf",
        f"openvino=={OV_VERSION}",
        f"openvino-genai=={OV_VERSION}.0",
        f"openvino-tokenizers=={OV_VERSION}.0",
    ],
]
CACHE = Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmc")) / "bench"


def _layered_env(env: Path) -> Path:
    """A venv at `env` whose python also sees the project's .venv (llmc, torch)."""
    python = env / "bin" / "python"
    if not python.exists():
        base = Path(sys.base_prefix) / "bin" / "python3"
        subprocess.run([str(base), "-m", "venv", str(env)], check=True)
        site = next(env.glob("lib/python3*/site-packages"))
        ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
        # addsitedir also runs the .pth files there (the editable llmc install is one)
        (site / "llmc-project.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n")
    return python


def ov_env() -> Path:
    """bench/.venv-ov: OpenVINO GenAI and optimum-intel over the project's .venv."""
    python = _layered_env(OV_ENV)
    check = [str(python), "-c", "import openvino_genai, optimum.intel"]
    if subprocess.run(check, capture_output=True).returncode:
        import torch

        pin = OV_ENV / "torch-pin.txt"  # nothing may pull a CUDA torch over the CPU one
        pin.write_text(f"torch=={torch.__version__}\n")
        for packages in OV_PACKAGES:
            cmd = [str(python), "-m", "pip", "install", "-q", "-c", str(pin), *packages]
            subprocess.run(cmd, check=True)
    return python


def ov_model(python: Path, precision: str) -> Path:
    """optimum-intel's OpenVINO IR of the same weights (`optimum-cli export openvino
    --weight-format PRECISION`, group size 32 for int4: its default 128 does not divide 576)."""
    out = CACHE / f"optimum-intel-{OV_VERSION}-{precision}"
    if (out / "openvino_model.xml").is_file():
        return out
    cmd = [str(python), "-m", "optimum.commands.optimum_cli", "export", "openvino"]
    cmd += ["--model", str(_hf_dir()), "--task", "text-generation-with-past"]
    cmd += ["--weight-format", precision, *(["--group-size", "32"] if precision == "int4" else [])]
    subprocess.run([*cmd, str(out)], check=True, capture_output=True)
    return out


def _hf_dir() -> Path:
    """The fp32 weights as a Hugging Face directory, for the reference exporters."""
    hf_dir = CACHE / "smollm2-hf"
    if not (hf_dir / "config.json").is_file():
        from llmc.compiler import sources

        loaded = sources.load(sources.resolve(None))
        loaded.model.save_pretrained(hf_dir)
        loaded.tokenizer.save_pretrained(hf_dir)
    return hf_dir


def reference_env() -> Path:
    """bench/.venv-ref: a venv over the project's .venv with onnxruntime-genai added."""
    python = _layered_env(REF_ENV)
    check = subprocess.run([str(python), "-c", "import onnxruntime_genai"], capture_output=True)
    if check.returncode:
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                f"onnxruntime-genai=={OG_VERSION}",
            ],
            check=True,
        )
    return python


def reference_model(python: Path, precision: str) -> Path:
    """onnxruntime-genai's CPU model of the same weights, built by its model builder at
    `precision` (fp32, int8 or int4: its defaults, symmetric blocks of 32, accuracy level 4)."""
    out = CACHE / f"ort-genai-{OG_VERSION}-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    hf_dir = _hf_dir()
    subprocess.run(
        [
            str(python),
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf_dir),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(CACHE / "ort-genai-cache"),
        ],
        check=True,
        capture_output=True,
    )
    return out


def ov_stamps(ov_genai):
    """An OpenVINO GenAI streamer that times each token (with prompt lookup a step's tokens
    arrive as one list); ov_genai is imported by the caller, in the bench's OpenVINO venv."""

    class Stamps(ov_genai.StreamerBase):
        def __init__(self):
            super().__init__()
            self.times, self.tokens = [], []

        def write(self, token):
            for t in token if isinstance(token, list) else [token]:
                self.times.append(time.perf_counter())
                self.tokens.append(int(t))
            return ov_genai.StreamingStatus.RUNNING

        def end(self):
            pass

    return Stamps()
