"""GPU check of the inductor target (run it where an NVIDIA GPU is; JSON out). Not run yet: no
GPU was lent to the session that wrote it (see the issue's closing note).

One script, in order: build SmolLM2 with `--target inductor` on the GPU (LLMC_INDUCTOR_DEVICE=
cuda), check 64 greedy tokens of the artifact against transformers eager on the GPU, then time
decode (128 new tokens, median of 3) of: the artifact; transformers eager `generate`; and a
static-cache decode loop compiled with torch.compile(mode="reduce-overhead") (CUDA graphs), the
fastest PyTorch-only loop. Precision: fp32 with TF32 off, so that greedy tokens can be identical;
fp16 needs the target's precision option (not in this version).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = ROOT / "artifacts" / "gpu-smollm2-inductor"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
NEW = 128


def _median_tok_s(run) -> float:
    run()  # warm-up (CUDA graphs are captured here)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return NEW / statistics.median(times)


def main() -> None:
    import torch

    import llmc.runtime as rt
    from llmc.compiler import sources

    assert torch.cuda.is_available(), "run this where an NVIDIA GPU is visible"
    torch.backends.cuda.matmul.allow_tf32 = False
    env = {**os.environ, "LLMC_INDUCTOR_DEVICE": "cuda"}
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "llmc.cli", "build", "-t", "inductor", "--out", str(ARTIFACT)]
    subprocess.run(cmd, check=True, env=env)
    build_s = time.perf_counter() - start
    gen = rt.load(ARTIFACT)
    ids = gen.encode(PROMPT)
    ref = sources.load(sources.resolve(None))
    model = ref.model.to("cuda").eval()
    prompt = torch.tensor([ids], device="cuda")

    def eager():
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                  pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip

    def ours():
        return [
            int(t[0]) for t in gen.generate_ids([ids], rt.GenerationConfig(NEW, ignore_eos=True))
        ]

    want, got = eager(), ours()
    same = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), NEW)

    def compiled_loop():
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                  pad_token_id=0, cache_implementation="static")  # fmt: skip

    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "build_s": round(build_s, 1),
        "greedy_identical_prefix_vs_eager": same,
        "decode_tok_s": {
            "llmc-inductor": _median_tok_s(ours),
            "transformers-eager": None,
            "static-cache-reduce-overhead": _median_tok_s(compiled_loop),
        },
    }
    model.forward = model.__class__.forward.__get__(model)
    result["decode_tok_s"]["transformers-eager"] = _median_tok_s(eager)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
