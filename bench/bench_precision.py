"""4-bit precision plans (issue 20): perplexity, plan and decode speed against the reference
engine's int4, per budget (JSON out).

For each budget, SmolLM2 is built with `--quant int4 --max-ppl-increase B`, calibrated on the second
half of the dev text (the plan's search and GPTQ see none of the tokens it is judged on) and gated
on its first `--eval-tokens` tokens (both the prompt and the decode path). Then bench_decode.py
runs the artifact against onnxruntime-genai's `-p int4` model (onnx) or OpenVINO GenAI on
optimum-intel's int4 IR (openvino) in the same run, interleaved, medians of `--runs` rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare-dev.txt"


def held_out_calibration(directory: Path) -> Path:
    """The dev text's second half, as the calibration file."""
    text = TEXT.read_text(encoding="utf-8")
    path = directory / "calibration-second-half.txt"
    path.write_text(text[len(text) // 2 :], encoding="utf-8")
    return path


def build(target: str, budget: str, out: Path, calib: Path, eval_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "llmc.cli", "build", "-t", target, "--out", str(out)]
    cmd += ["--quant", "int4", "--max-ppl-increase", budget, "--calib", str(calib)]
    cmd += ["--eval", str(TEXT), "--eval-tokens", str(eval_tokens), "--no-cache"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode:
        return {"built": False, "exit_code": proc.returncode, "error": proc.stderr[-600:]}
    m = json.loads((out / "llmc.json").read_text())
    q, e = m["quantization"], m["evaluation"]
    return {
        "built": True,
        "build_s": seconds,
        "plan": {k: q["plan"][k] for k in ("forms", "promoted", "calibration_increase")},
        "perplexity_increase": round(e["increase"], 4),
        "decode_path_increase": round(e.get("decode_path", {}).get("increase", e["increase"]), 4),
        **({"exact_kernels_increase": round(e["exact"]["increase"], 4)} if "exact" in e else {}),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["onnx", "openvino"], default="onnx")
    parser.add_argument("--budgets", default="3%,10%", help="Comma-separated, e.g. 3%%,10%%.")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Also write the result to this file.")
    args = parser.parse_args()
    work = ROOT / "artifacts"
    calib = held_out_calibration(work)
    results = {}
    for budget in args.budgets.split(","):
        out = work / f"bench-smollm2-{args.target}-plan{budget.rstrip('%')}"
        entry = build(args.target, budget, out, calib, args.eval_tokens)
        if entry["built"]:
            report = ROOT / "artifacts" / f".bench-plan-{budget.rstrip('%')}.json"
            cmd = [sys.executable, str(ROOT / "bench" / "bench_decode.py"), "--target"]
            cmd += [args.target, "--precision", "int4", "--artifact", str(out)]
            cmd += ["--runs", str(args.runs), "--skip-transformers", "--json", str(report)]
            subprocess.run(cmd, check=True, capture_output=True)
            speed = json.loads(report.read_text())
            ratios = next(v for k, v in speed.items() if k.startswith("ratios_llmc_over_"))
            entry["speed"] = {"ratios": ratios, "engines": speed["engines"]}
        results[budget] = entry
    report = {
        "protocol": {
            "model": "SmolLM2-135M-Instruct, --quant int4 --max-ppl-increase BUDGET",
            "target": args.target,
            "calibration": "the dev text's second half",
            "gate": f"the dev text's first {args.eval_tokens} tokens, prompt and decode paths",
            "speed": f"bench_decode.py --precision int4, {args.runs} interleaved rounds, median",
        },
        "budgets": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
