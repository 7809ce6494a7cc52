"""First greedy tokens of each real-checkpoint artifact in its runtime's own generator, against its eager model.

For every artifact `real_checkpoints.py` exported (benchmarks/work/real/*.artifact), the prompt is encoded
as the model's tokenizer defines it (SmolLM2: no BOS), and greedy tokens are generated three ways:

- the runtime's generator: onnxruntime-genai's ``og.Generator`` on the ONNX folder, ExecuTorch's C++
  ``TextLLMRunner`` on the ``.pte`` with the tokenizer export() copied beside it (``num_bos`` from the
  manifest's tokenizer policy);
- edgeforge's eager quantized model (the artifact's source, computing with the target's activation numerics);
- the fp32 model, for scale.

Reported per artifact: how many leading tokens the runtime's text shares with eager's, and the teacher-forced
check (tests/tolerances.py's idea): along the runtime's own tokens, how far each chosen token's logit lies
below the best one, under eager and under edgeforge's session of the same artifact (the graph the runtime's
generator drives: near zero there, or the generator feeds it something else). Where the runtime and eager
chains part, eager's shortfall is its top-2 gap there: a near-tie, or a real difference.
Results: benchmarks/results/real_greedy.json and a Markdown table on stdout.

    python benchmarks/real_greedy.py                       # every artifact in benchmarks/work/real
    python benchmarks/real_greedy.py --prompt "Once upon a time" --new-tokens 48
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work" / "real"
DEFAULT_MODEL = REPO / "benchmarks" / "work" / "smollm2" / "hf"
RESULTS = REPO / "benchmarks" / "results" / "real_greedy.json"


def runtime_text(artifact, prompt_ids: list[int], prompt: str, new_tokens: int) -> tuple[str, list[int] | None]:
    """(text, ids or None) the artifact's runtime generates greedily; TextLLMRunner hands back text pieces only."""
    record = artifact.record
    if record.format == "onnx":
        import numpy as np
        import onnxruntime_genai as og

        model = og.Model(str(artifact.path))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        ids = []
        while not generator.is_done() and len(ids) < new_tokens:
            generator.generate_next_token()
            ids.append(int(generator.get_next_tokens()[0]))
        return None, ids
    from edgeforge.export.executorch.session import register_kernels

    register_kernels()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    runner = TextLLMRunner(str(artifact.model_file), str(artifact.path / record.report.runner_tokenizer))
    pieces: list[str] = []
    num_bos = 1 if record.tokenizer.adds_bos else 0
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=new_tokens, temperature=0.0, num_bos=num_bos),
                    pieces.append)
    return "".join(pieces), None


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(artifact_dir: Path, model_dir: Path, prompt: str, new_tokens: int, fp32_tokens: list[int]) -> dict:
    from edgeforge.checkpoints import open_checkpoint
    from edgeforge.export import open_artifact
    from edgeforge.generate import generate, teacher_forced_shortfall
    from edgeforge.quantize import load_quantized_model

    artifact = open_artifact(artifact_dir)
    record = artifact.record
    tokenizer = open_checkpoint(model_dir).tokenizer
    prompt_ids = tokenizer.encode(prompt)
    eager = load_quantized_model(record.source.path, numerics=record.target.activation_numerics).eval()
    eager_tokens = generate(eager, prompt_ids, max_new_tokens=new_tokens)
    text, runtime_ids = runtime_text(artifact, prompt_ids, prompt, new_tokens)
    if runtime_ids is None:  # TextLLMRunner: re-encode its text (byte-level BPE round-trips its own output)
        runtime_ids = tokenizer.encode(text, add_special_tokens=False)[:new_tokens]
    eager.setup_cache(1, len(prompt_ids) + len(runtime_ids))
    shortfall = teacher_forced_shortfall(eager, prompt_ids, runtime_ids).tolist()
    session_shortfall = teacher_forced_shortfall(artifact.open().forward, prompt_ids, runtime_ids).tolist()
    parted = common_prefix(runtime_ids, eager_tokens)
    return {"artifact": artifact_dir.name, "format": record.format, "target": record.target.name,
            "scheme": record.scheme, "runtime": "onnxruntime-genai" if record.format == "onnx"
            else "executorch TextLLMRunner", "prompt_ids": prompt_ids,
            "runtime_tokens": runtime_ids, "eager_tokens": eager_tokens, "same_leading_tokens": parted,
            "of": len(eager_tokens), "same_as_fp32_leading_tokens": common_prefix(runtime_ids, fp32_tokens),
            "shortfall_max": max(shortfall), "session_shortfall_max": max(session_shortfall),
            "shortfall_at_parting": shortfall[parted] if parted < len(shortfall)
            else None, "runtime_text": tokenizer.decode(runtime_ids), "eager_text": tokenizer.decode(eager_tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL, help="fp32 HF Llama directory")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--artifacts", default="*.artifact", help="glob of artifact directories in the work folder")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()

    from edgeforge.checkpoints import load_model, open_checkpoint
    from edgeforge.fileio import write_json_atomic
    from edgeforge.generate import generate

    checkpoint = open_checkpoint(args.model)
    fp32_tokens = generate(load_model(checkpoint).eval(), checkpoint.tokenizer.encode(args.prompt),
                           max_new_tokens=args.new_tokens)
    rows = []
    for artifact_dir in sorted(WORK.glob(args.artifacts)):
        print(f"{artifact_dir.name} ...", file=sys.stderr, flush=True)
        rows.append(measure(artifact_dir, args.model, args.prompt, args.new_tokens, fp32_tokens))
        write_json_atomic(args.json, {"model": str(args.model), "prompt": args.prompt, "fp32_tokens": fp32_tokens,
                                      "fp32_text": checkpoint.tokenizer.decode(fp32_tokens), "rows": rows})
    print("| artifact | runtime | same leading tokens as eager | as fp32 | max shortfall: eager | session |\n"
          "|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['artifact']} | {row['runtime']} | {row['same_leading_tokens']}/{row['of']} | "
              f"{row['same_as_fp32_leading_tokens']}/{row['of']} | {row['shortfall_max']:.3g} | {row['session_shortfall_max']:.3g} |")


if __name__ == "__main__":
    main()
