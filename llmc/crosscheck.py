"""One build, several targets: load the source once, build each target (sharing the quantized
weights: compiler/quant_cache), then check the artifacts against each other and record it in
every manifest — the same quantized weights by digest, the logits of every pair within
tolerance and the same greedy tokens, teacher-forced on the verification prompts."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np

from llmc.artifact import read_manifest, write_manifest
from llmc.config import BuildConfig
from llmc.errors import LlmcError, VerificationError


def target_names(text: str) -> list[str]:
    """`onnx,openvino` -> ["onnx", "openvino"]; a repeated or empty name is refused."""
    names = [n.strip() for n in text.split(",")]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise LlmcError(f"--target {text}: name each target once, separated by commas.")
    return names


def build_targets(config: BuildConfig, progress=None) -> tuple[list, dict]:
    """Build every target of `config.target` (comma-separated) from one loaded source; return
    the results and the cross-check (also written into each manifest). With --out DIR, target T
    goes to DIR/T; without, each to its default place."""
    import copy

    from llmc import targets
    from llmc.build import Progress, build
    from llmc.compiler import sources

    progress = progress or Progress()
    names = target_names(config.target)
    configs = []
    for name in names:  # every flag error before the first build
        info = targets.get(name)
        one = dataclasses.replace(
            config, target=name, out=Path(config.out) / name if config.out else None
        )
        info.options(one)
        configs.append(one)
    config.check()
    loaded = None
    results = []
    for i, one in enumerate(configs):
        progress.note(f"[{i + 1}/{len(configs)}] target {one.target}")
        if loaded is None and i + 1 < len(configs):
            with progress.stage(f"load model {config.model or 'SmolLM2-135M-Instruct'}"):
                loaded = sources.load(sources.resolve(config.model))
        # passes may change weights in place (AWQ folds scales): each target traces its own copy
        mine = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model)) if loaded else None
        results.append(build(one, progress, loaded=mine))
    tolerance = config.tolerance or _tolerance(results[0].manifest)
    with progress.stage(f"cross-check {', '.join(names)}"):
        record = cross_check([(r.path, r.manifest) for r in results], 2 * tolerance)
    for r in results:
        manifest = read_manifest(r.path, check_files=False)
        manifest["cross_check"] = record
        write_manifest(r.path, manifest, manifest["files"])
        r.manifest = read_manifest(r.path, check_files=False)
    for pair in record["pairs"]:
        progress.note(
            f"{pair['pair']}: max |Δlogits| {pair['max_abs_diff']:.2e}, greedy "
            f"{pair['greedy_agreement']}/{pair['steps_compared']}"
        )
    if record["quantized"]:
        same = "the same" if record["same_weights"] else "DIFFERENT"
        progress.note(f"quantized weights: {same} in every target")
    if not record["passed"]:
        raise VerificationError(
            f"the {', '.join(names)} artifacts disagree with each other ({record['summary']}); "
            "they were kept, with the cross-check in their manifests, for inspection."
        )
    return results, record


def _tolerance(manifest: dict) -> float:
    from llmc.compiler.verify import default_tolerance

    verified = manifest.get("verification", {})
    return verified.get("tolerance") or default_tolerance(manifest["source"]["kind"])


class _ArtifactReference:
    """An artifact's exact sequence in the role compiler.verify gives PyTorch: the reference
    whose greedy token both sides are fed."""

    def __init__(self, name: str, sequence):
        self.name, self.sequence = f"llmc-{name}", sequence

    def prefill(self, ids):
        import torch

        return torch.from_numpy(np.asarray(self.sequence.prefill(np.asarray([ids]))))

    def decode(self, token: int):
        import torch

        return torch.from_numpy(np.asarray(self.sequence.decode(np.asarray([[token]]))))


def cross_check(artifacts: list[tuple[Path, dict]], tolerance: float) -> dict:
    """Every pair of artifacts, teacher-forced on the verification prompts with the first's
    greedy tokens; the quantized weights' digests compared."""
    from llmc import targets
    from llmc.compiler.verify import verify, verify_prompts

    sequences = {}
    for path, manifest in artifacts:
        info = targets.get(manifest["target"]["name"])
        model = info.model_class(verify=True).open(path, manifest, exact=True)
        sequences[info.name] = model.sequence()
    tokenizer = _tokenizer(artifacts[0])
    context = min(s.max_context for s in sequences.values())
    steps = artifacts[0][1].get("verification", {}).get("decode_steps", 8)
    prompts = verify_prompts(tokenizer, context, steps)
    pairs = []
    for (a, seq_a), (b, seq_b) in itertools.combinations(sequences.items(), 2):
        found = verify(_ArtifactReference(a, seq_a), seq_b, prompts, tolerance, steps)
        pairs.append({"pair": f"{a} x {b}", **found.to_dict()})
        seq_a.reset()
    digests = {
        m["target"]["name"]: (m.get("quantization") or {}).get("weights_sha256")
        for _, m in artifacts
    }
    quantized = any(d is not None for d in digests.values())
    same = len(set(digests.values())) == 1
    passed = all(p["passed"] for p in pairs) and (same or not quantized)
    worst = max((p["max_abs_diff"] for p in pairs), default=0.0)
    agree = sum(p["greedy_agreement"] for p in pairs)
    compared = sum(p["steps_compared"] for p in pairs)
    return {
        "targets": list(sequences),
        "tolerance": tolerance,
        "pairs": pairs,
        "quantized": quantized,
        "weights_sha256": digests if quantized else None,
        "same_weights": same if quantized else None,
        "passed": passed,
        "summary": f"worst max |Δlogits| {worst:.2e} (tolerance {tolerance:.0e}), greedy "
        f"{agree}/{compared}" + ("" if same or not quantized else ", different quantized weights"),
    }


def _tokenizer(artifact: tuple[Path, dict]):
    from llmc.runtime.tokenizer import Tokenizer

    path, manifest = artifact
    return Tokenizer(path, manifest.get("generation", {}))
