"""Decode ms/token of edgeforge's .pte and ONNX artifacts against optimum-executorch's 8da4w .pte and the
onnxruntime-genai builder's int4 ONNX, all exported from the same random SmolLM-135M-shaped Llama.

The weights are random (benchmarks/make_llama_checkpoint.py --preset 135m): the numbers mean speed only.

Steps (benchmarks/README.md, "peer_decode.py", has them in full; everything lands in benchmarks/work/):

    bash benchmarks/peers/setup.sh       # the peers' own venvs (other transformers pins): never our deps
    bash benchmarks/peers/export.sh      # peer-optimum-8da4w/ and peer-ortgenai-int4/
    edgeforge export benchmarks/work/smol-135m-8da4w --target host --max-seq-len 512 -o benchmarks/work/smol-135m-8da4w.host
    edgeforge export benchmarks/work/smol-135m-8da4w --target onnx-cpu --max-seq-len 512 \
        -o benchmarks/work/smol-135m-8da4w.onnx-cpu
    python benchmarks/peer_decode.py --json benchmarks/results/peer_decode.json

Every artifact runs in the same runtime, from this (edgeforge's) venv:
- .pte: ExecuTorch's LLM runner (``executorch.extension.llm.runner.TextLLMRunner``), greedy
  (temperature 0), ``max_new_tokens`` = N: the first token comes from the prefill, then its decode loop
  runs N - 1 forwards, which its Stats count as ``num_generated_tokens``. decode ms/token =
  (inference_end_ms - prompt_eval_end_ms) / num_generated_tokens, the runner's own figure (integer-ms
  stamps); the same from ``perf_counter`` stamps taken in the token callback is recorded beside it. The
  prompt goes in as text (the runner tokenizes it with the tokenizer.json beside the .pte; the record
  keeps the count it reports); the LLM runner has no ignore-EOS option, so a run that stops early shows
  up as a note under the table (random weights, greedy: it has not happened).
- ONNX: onnxruntime-genai's ``Generator``, greedy, ``max_length`` 512 (the .pte programs' static cache),
  ``min_length`` = prompt + N so EOS cannot end a run. After ``append_tokens(prompt ids)`` (the prefill),
  the first ``generate_next_token`` only picks from the prefill's logits; each of the next N - 1 runs
  one decode forward and picks: decode ms/token = their total / (N - 1), timed with ``perf_counter``.
So in both runtimes a sample is N - 1 single-token forwards + greedy picks after a prefill of P tokens.

Threads: ExecuTorch's threadpool is sized with ``portable_lib._unsafe_reset_threadpool(t)`` (the LLM
runner links that same library); onnxruntime-genai gets decoder ``session_options`` intra_op_num_threads
= t, inter_op 1. Every worker runs with OMP_NUM_THREADS=1 (override: PEER_DECODE_OMP_THREADS): in the
pip wheels the llama::custom_sdpa kernel calls libtorch's MKL, whose OpenMP threads spin-wait after each
call and steal a core from XNNPACK's threadpool at t=2 (bimodal 6 / 14 ms runs); ExecuTorch on a device
has no OpenMP, and onnxruntime does not use it.

Method: each artifact lives in its own worker process (this file with ``--worker``; native code's stdout
goes to stderr, each worker's to benchmarks/work/peer_decode-logs/). For each thread count the workers
load, then ``--warmup`` untimed rounds and ``--repetitions`` timed rounds run; a round runs every artifact
once, in an order that reverses every other round (ABCD DCBA ...) so a noisy neighbour slows all of them
alike. Figures: median and IQR over the rounds; "speed / peer's" is edgeforge's speed over the peer's of
the same format, per round (peer ms / edgeforge ms), median and IQR: at least 1 = at least as fast.

Extra rows: ``--peer-runtime`` also runs optimum's .pte under the peer venv's own ExecuTorch;
``--diagnostic`` also runs edgeforge artifacts quantized with benchmarks/peers/int4-xnnpack-out4.toml
(the output projection at 4 bits g32 like both peers, instead of the int4-xnnpack recipe's 8 bits per
channel); make them as in benchmarks/README.md.

    python benchmarks/peer_decode.py                         # 1 and 2 threads, 7 rounds, P=64, N=128
    python benchmarks/peer_decode.py -r 3 --threads 2        # quick look
    python benchmarks/peer_decode.py -r 11 --diagnostic --peer-runtime --json benchmarks/results/peer_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work"
LOGS = WORK / "peer_decode-logs"
MAX_LENGTH = 512  # the .pte programs' static KV cache; ONNX generators get the same max_length

# name, kind, directory, producer, interpreter (None: this one)
ARTIFACTS = [
    ("edgeforge .pte", "pte", WORK / "smol-135m-8da4w.host", "edgeforge export --target host", None),
    ("optimum-executorch .pte", "pte", WORK / "peer-optimum-8da4w", "optimum-cli export executorch", None),
    ("edgeforge ONNX", "onnx", WORK / "smol-135m-8da4w.onnx-cpu", "edgeforge export --target onnx-cpu", None),
    ("ORT-genai builder ONNX", "onnx", WORK / "peer-ortgenai-int4", "onnxruntime_genai.models.builder", None),
]
# --diagnostic: edgeforge with the output projection at 4 bits g32 (as both peers do; the int4-xnnpack recipe
# keeps it at 8 bits per channel): quantized with benchmarks/peers/int4-xnnpack-out4.toml, same exports.
DIAGNOSTIC = [
    ("edgeforge .pte, output 4-bit", "pte", WORK / "smol-135m-8da4w-out4.host", "edgeforge export --target host", None),
    ("edgeforge ONNX, output 4-bit", "onnx", WORK / "smol-135m-8da4w-out4.onnx-cpu", "edgeforge export --target onnx-cpu",
     None),
]
PEERS = {"pte": "optimum-executorch .pte", "onnx": "ORT-genai builder ONNX"}  # compared against, same format
PEER_RUNTIME = ("optimum-executorch .pte (peer ET)", "pte", WORK / "peer-optimum-8da4w",
                "optimum-cli export executorch", WORK / "venv-optimum-executorch" / "bin" / "python")

# Prompt text (plain English, no model knowledge needed): cut to exactly --prompt-tokens tokens.
PROMPT_TEXT = (
    "Once upon a time there was a little girl named Lily who lived in a small house near the woods. "
    "Every morning she walked to the river with her dog Max to look at the fish and the birds. One day "
    "she found a shiny red ball under a big tree. She picked it up and asked Max if he wanted to play. "
    "Max barked and ran in circles, so Lily threw the ball as far as she could. They played all day "
    "until the sun went down, and then they walked home together, tired and happy. Her mom made warm "
    "soup for dinner and told her a story about a brave little bird who flew over the mountains to find "
    "his family. Lily fell asleep with a smile and dreamed of red balls, rivers and birds."
)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- worker (runs in any venv) ----

class PteRunner:
    """A .pte in ExecuTorch's TextLLMRunner."""

    def __init__(self, directory: Path, threads: int):
        import importlib

        for module in ("executorch.extension.pybindings.portable_lib",  # the runtime, then its kernels
                       "executorch.extension.llm.custom_ops.custom_ops",  # llama::custom_sdpa, update_cache
                       "executorch.kernels.quantized"):  # quantized_decomposed::embedding_*
            importlib.import_module(module)
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)
        self.threads_note = f"ExecuTorch threadpool {portable_lib._threadpool_get_thread_count()}"
        self.GenerationConfig = GenerationConfig
        pte = _one(directory, "*.pte")
        start = time.perf_counter()
        self.runner = TextLLMRunner(str(pte), str(directory / "tokenizer.json"))
        self.load_s = time.perf_counter() - start  # construction only: the runner loads lazily
        self.files = [pte]

    def run(self, prompt: str, ids: list[int], decode_tokens: int) -> dict:
        stamps, stats = [], {}

        def on_token(_piece: str) -> None:
            stamps.append(time.perf_counter())

        def on_stats(s) -> None:
            stats.update(json.loads(s.to_json_string()))
            stats.update({name: getattr(s, name) for name in (
                "num_prompt_tokens", "num_generated_tokens", "inference_start_ms", "token_encode_end_ms",
                "prompt_eval_end_ms", "first_token_ms", "inference_end_ms", "aggregate_sampling_time_ms")})

        self.runner.reset()
        config = self.GenerationConfig(echo=False, max_new_tokens=decode_tokens, temperature=0.0, seq_len=MAX_LENGTH)
        start = time.perf_counter()
        self.runner.generate(prompt, config, on_token, on_stats)
        wall = time.perf_counter() - start
        # Stats count as "generated" the tokens of the decode loop, each one forward + pick; the first new
        # token (picked from the prefill's logits, stamped prompt_eval_end_ms) is not among them.
        forwards = int(stats["num_generated_tokens"])
        decode_ms = stats["inference_end_ms"] - stats["prompt_eval_end_ms"]
        return {
            "prompt_tokens": int(stats["num_prompt_tokens"]),
            "generated_tokens": forwards + 1,
            "decode_forwards": forwards,
            "decode_ms_per_token": decode_ms / max(forwards, 1),
            "decode_ms_per_token_callback": (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1)
            if len(stamps) > 1 else None,
            "callbacks": len(stamps),
            "prefill_ms": stats["prompt_eval_end_ms"] - stats["inference_start_ms"],  # tokenizing included
            "wall_s": wall,
            "runner_stats": stats,
        }


class OnnxRunner:
    """An onnxruntime-genai model folder (genai_config.json) in og.Generator."""

    def __init__(self, directory: Path, threads: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(directory))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        start = time.perf_counter()
        self.model = og.Model(config)
        self.load_s = time.perf_counter() - start
        self.threads_note = f"onnxruntime intra_op_num_threads {threads}, inter_op 1"
        self.files = [f for f in directory.iterdir() if f.name.startswith("model.onnx")]

    def run(self, prompt: str, ids: list[int], decode_tokens: int) -> dict:
        import numpy as np

        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=MAX_LENGTH, min_length=len(ids) + decode_tokens, do_sample=False,
                                  batch_size=1)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(decode_tokens):
            t0 = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - t0)
            if generator.is_done():
                break
        wall = time.perf_counter() - start
        generated = len(steps)
        decode = steps[1:]  # steps[0] picks from the prefill's logits; each later one is a forward + pick
        return {
            "prompt_tokens": len(ids),
            "generated_tokens": generated,
            "decode_forwards": len(decode),
            "decode_ms_per_token": sum(decode) * 1e3 / max(len(decode), 1),
            "decode_ms_per_token_callback": None,
            "prefill_ms": prefill * 1e3,
            "wall_s": wall,
        }


def _one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} in {directory}, found {[f.name for f in found]}")
    return found[0]


def _versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for package in ("torch", "executorch", "onnxruntime", "onnxruntime-genai", "transformers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def worker() -> None:
    """JSON lines on stdin -> one JSON line each on the original stdout; native output goes to stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    model = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "load":
                kind = {"pte": PteRunner, "onnx": OnnxRunner}[request["kind"]]
                model = kind(Path(request["path"]), request["threads"])
                reply = {"load_s": model.load_s, "threads_note": model.threads_note, "versions": _versions(),
                         "model_bytes": sum(f.stat().st_size for f in model.files),
                         "model_files": sorted(f.name for f in model.files)}
            elif request["op"] == "run":
                import gc

                gc.disable()
                try:
                    reply = model.run(request["prompt"], request["ids"], request["decode_tokens"])
                finally:
                    gc.enable()
            elif request["op"] == "quit":
                break
            else:
                reply = {"error": f"unknown op {request['op']}"}
        except Exception as exc:  # noqa: BLE001  (reported to the parent, which decides)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        channel.write(json.dumps(reply) + "\n")


# ---------------------------------------------------------------- parent (edgeforge's venv) ----

class Worker:
    def __init__(self, name: str, interpreter: Path | None, threads: int):
        LOGS.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        self.log_path = LOGS / f"{slug}-t{threads}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115  (closed in close(), after the worker exits)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=os.environ.get("PEER_DECODE_OMP_THREADS", "1"))
        self.process = subprocess.Popen([str(interpreter or sys.executable), str(Path(__file__).resolve()), "--worker"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env=env, cwd=REPO)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died; see {self.log_path}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{reply['error']} (log: {self.log_path})")
        return reply

    def close(self) -> None:
        try:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
        self.log.close()


def prompt_for(tokenizer_json: Path, count: int) -> tuple[str, list[int]]:
    """The first word prefix of PROMPT_TEXT (repeated as needed) that encodes to exactly ``count`` tokens
    (no BOS: the checkpoint's tokenizer.json has no post-processor, and the runner adds none)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    text = PROMPT_TEXT
    while len(tokenizer.encode(text, add_special_tokens=False).ids) < count:
        text = text + " " + PROMPT_TEXT
    words = text.split(" ")
    for k in range(1, len(words) + 1):
        candidate = " ".join(words[:k])
        ids = tokenizer.encode(candidate, add_special_tokens=False).ids
        if len(ids) == count:
            return candidate, ids
        if len(ids) > count:
            break
    raise SystemExit(f"no word prefix of the prompt text encodes to exactly {count} tokens; pick another count")


def describe_graph(kind: str, directory: Path) -> dict:
    """What the artifact's graph does: for a .pte its methods, delegate calls and the kernels outside the
    delegate (decode runs them every step); for ONNX its op types, MatMulNBits settings and KV-cache mode."""
    from collections import Counter

    if kind == "pte":
        from executorch.exir._serialize._program import deserialize_pte_binary

        program = deserialize_pte_binary(_one(directory, "*.pte").read_bytes())
        program = getattr(program, "program", program)
        forward = next(plan for plan in program.execution_plan if plan.name == "forward")
        outside, delegate_calls = Counter(), 0
        for chain in forward.chains:
            for instruction in chain.instructions:
                args = instruction.instr_args
                if type(args).__name__ == "KernelCall":
                    op = forward.operators[args.op_index]
                    outside[op.name + (f".{op.overload}" if op.overload else "")] += 1
                elif type(args).__name__ == "DelegateCall":
                    delegate_calls += 1
        return {"methods": [plan.name for plan in program.execution_plan], "delegate_calls": delegate_calls,
                "delegates": sorted({d.id for d in forward.delegates}),
                "kernels_outside_delegate": dict(sorted(outside.items()))}
    import onnx

    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    ops = Counter((f"{n.domain}::" if n.domain else "") + n.op_type for n in model.graph.node)
    nbits = Counter()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            nbits[f"bits={attrs.get('bits')} block={attrs.get('block_size')} "
                  f"accuracy_level={attrs.get('accuracy_level')}"] += 1
    genai = json.loads((directory / "genai_config.json").read_text())
    return {"nodes": sum(ops.values()), "op_types": dict(ops.most_common()), "matmulnbits": dict(nbits),
            "past_present_share_buffer": genai.get("search", {}).get("past_present_share_buffer"),
            "context_length": genai.get("model", {}).get("context_length")}


def spread(samples: list[float]) -> dict:
    from edgeforge.verify.bench import Spread

    return vars(Spread.of(samples)) if samples else {}


def artifact_bytes(directory: Path) -> dict:
    files = {f.name: f.stat().st_size for f in sorted(directory.iterdir()) if f.is_file()}
    model = sum(size for name, size in files.items() if name.endswith(".pte") or name.startswith("model.onnx"))
    return {"model_bytes": model, "files": files}


def measure(artifacts: list[tuple], args, prompt: str, ids: list[int]) -> list[dict]:
    results = []
    for threads in args.threads:
        load_before = os.getloadavg()
        say(f"--- {threads} thread(s): loading {len(artifacts)} workers (load average {load_before[0]:.2f}) ...")
        workers, loads = [], []
        try:
            for name, kind, directory, _producer, interpreter in artifacts:
                w = Worker(name, interpreter, threads)
                workers.append(w)
                loads.append(w.ask(op="load", kind=kind, path=str(directory), threads=threads))
                say(f"  {name}: loaded in {loads[-1]['load_s']:.2f} s ({loads[-1]['threads_note']})")
            runs = [[] for _ in artifacts]
            total = args.warmup + args.repetitions
            for round_ in range(total):
                order = list(range(len(artifacts)))
                if round_ % 2:
                    order.reverse()
                timed = round_ >= args.warmup
                for i in order:
                    r = workers[i].ask(op="run", prompt=prompt, ids=ids, decode_tokens=args.decode_tokens)
                    if timed:
                        runs[i].append(r)
                    say(f"  round {round_ + 1}/{total}{'' if timed else ' (warm-up)'} {artifacts[i][0]}: "
                        f"{r['decode_ms_per_token']:.2f} ms/token, {r['generated_tokens']} generated, "
                        f"prompt {r['prompt_tokens']}")
        finally:
            for w in workers:
                w.close()
        load_after = os.getloadavg()
        say(f"  load average {load_after[0]:.2f} at the end")
        for (name, kind, directory, producer, interpreter), load, samples in zip(artifacts, loads, runs):
            ms = [r["decode_ms_per_token"] for r in samples]
            callback = [r["decode_ms_per_token_callback"] for r in samples if r["decode_ms_per_token_callback"]]
            results.append({
                "artifact": name, "kind": kind, "path": str(directory.relative_to(REPO)), "producer": producer,
                "interpreter": str(Path(interpreter).relative_to(REPO)) if interpreter else "edgeforge venv",
                "threads": threads, "threads_note": load["threads_note"], "runtime_versions": load["versions"],
                "load_s": load["load_s"], "loadavg_1min_before_after": [load_before[0], load_after[0]],
                "decode_ms_per_token": spread(ms),
                "decode_tok_s_median": 1e3 / spread(ms)["median"] if ms else None,
                "decode_ms_per_token_callback": spread(callback),
                "prefill_ms": spread([r["prefill_ms"] for r in samples]),
                "prompt_tokens_seen": sorted({r["prompt_tokens"] for r in samples}),
                "generated_tokens_seen": sorted({r["generated_tokens"] for r in samples}),
                "samples": samples,
            })
    return results


def peer_versions() -> dict:
    out = {}
    for venv, packages in (("venv-optimum-executorch", ("optimum-executorch", "optimum", "executorch", "torch",
                                                        "torchao", "transformers")),
                           ("venv-ort-genai-builder", ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir",
                                                       "torch", "transformers"))):
        python = WORK / venv / "bin" / "python"
        if not python.exists():
            continue
        code = f"import json; from importlib import metadata as m; print(json.dumps({{p: m.version(p) for p in {packages!r}}}))"
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
        out[venv] = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-300:]}
    return out


def add_paired_ratios(results: list[dict]) -> None:
    """For each edgeforge row: its speed over the peer's of the same format and thread count (peer ms /
    edgeforge ms), one ratio per round (the rounds interleave the artifacts), median + IQR.
    At least 1: edgeforge is at least as fast as that peer."""
    peers = {(r["kind"], r["threads"]): r for r in results if r["artifact"] == PEERS[r["kind"]]}
    for r in results:
        peer = peers.get((r["kind"], r["threads"]))
        if peer is None or not r["artifact"].startswith("edgeforge"):
            continue
        pairs = [p["decode_ms_per_token"] / o["decode_ms_per_token"] for p, o in zip(peer["samples"], r["samples"])]
        r["speed_vs_peer"] = spread(pairs) | {"peer": peer["artifact"]}


def format_table(results: list[dict], sizes: dict) -> str:
    header = "| artifact | threads | decode ms/token, median | IQR | tok/s | n | speed / peer's, median (IQR) | model MiB |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        d, ratio = r["decode_ms_per_token"], r.get("speed_vs_peer")
        paired = f"{ratio['median']:.2f} ({ratio['iqr']:.2f})" if ratio else "-"
        lines.append(f"| {r['artifact']} | {r['threads']} | {d['median']:.2f} | {d['iqr']:.2f} | "
                     f"{1e3 / d['median']:.1f} | {d['n']} | {paired} | {sizes[r['path']]['model_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("-r", "--repetitions", type=int, default=7, help="timed rounds per thread count")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per thread count")
    parser.add_argument("--only", nargs="+", help="substrings of artifact names to keep")
    parser.add_argument("--peer-runtime", action="store_true",
                        help="also run optimum's .pte under the peer venv's ExecuTorch")
    parser.add_argument("--diagnostic", action="store_true",
                        help="also run edgeforge's artifacts quantized with the output projection at 4 bits")
    parser.add_argument("--json", type=Path, help="write the record here")
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    args.threads = [int(t) for t in args.threads.split(",")]

    artifacts = list(ARTIFACTS) + (DIAGNOSTIC if args.diagnostic else []) + ([PEER_RUNTIME] if args.peer_runtime else [])
    if args.only:
        artifacts = [a for a in artifacts if any(s.lower() in a[0].lower() for s in args.only)]
    missing = [str(a[2]) for a in artifacts if not a[2].is_dir()] + [str(a[4]) for a in artifacts
                                                                    if a[4] and not Path(a[4]).exists()]
    if missing:
        raise SystemExit("missing (see the steps in this script's docstring): " + ", ".join(missing))

    prompt, ids = prompt_for(WORK / "smol-135m-random" / "tokenizer.json", args.prompt_tokens)
    sizes = {str(a[2].relative_to(REPO)): artifact_bytes(a[2]) for a in artifacts}
    graphs = {str(a[2].relative_to(REPO)): describe_graph(a[1], a[2]) for a in artifacts}
    started = time.time()
    results = measure(artifacts, args, prompt, ids)
    add_paired_ratios(results)

    from edgeforge.verify.machine import describe_machine
    from edgeforge.verify.verify import provenance

    record = {
        "kind": "edgeforge.peer_decode", "schema_version": 1,
        "settings": {"prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                     "decode_forwards": args.decode_tokens - 1, "threads": args.threads,
                     "repetitions": args.repetitions, "warmup": args.warmup, "max_length": MAX_LENGTH,
                     "sampling": "greedy", "order": "every artifact once per round, reversed every other round"},
        "prompt": prompt, "prompt_ids": ids,
        "provenance": provenance("pte") | {"onnxruntime_genai": _versions().get("onnxruntime-genai")},
        "machine": vars(describe_machine(threads=max(args.threads))),
        "peer_versions": peer_versions(),
        "sizes": sizes, "graphs": graphs, "seconds": round(time.time() - started, 1), "results": results,
    }
    print(format_table(results, sizes))
    for r in results:
        odd = []
        if r["generated_tokens_seen"] != [args.decode_tokens]:
            odd.append(f"generated {r['generated_tokens_seen']} tokens, not {args.decode_tokens}")
        if r["prompt_tokens_seen"] != [args.prompt_tokens]:
            odd.append(f"prompt counted as {r['prompt_tokens_seen']} tokens")
        if odd:
            print(f"note: {r['artifact']} at {r['threads']} thread(s): {'; '.join(odd)}")
    if args.json:
        from edgeforge.fileio import write_json_atomic

        write_json_atomic(args.json, record)


if __name__ == "__main__":
    main()
