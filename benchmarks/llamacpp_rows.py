"""llama.cpp's Q8_0, Q4_0, Q4_K_M and Q4_K_M with an importance matrix, as rows beside edgeforge's on a real
checkpoint, scored by edgeforge's own verify statistics on the windows verify uses.

    bash benchmarks/peers/setup.sh llamacpp        # benchmarks/work/venv-llamacpp (about 10 minutes on 2 cores)
    python benchmarks/llamacpp_rows.py             # convert, imatrix, quantize, bits per weight, drift
    python benchmarks/llamacpp_rows.py --speed     # prefill and decode tokens/s, 1 and 2 threads

Default checkpoint: the shared SmolLM2-135M (fp32 HF; benchmarks/real_checkpoints.py says how to build it), with
WikiText-2 split as benchmarks/real_checkpoints.py splits it (its calibration part for the importance matrix,
its evaluation part for the drift). Steps, each skipped when its output exists (in --out):
- convert_hf_to_gguf.py --outtype f32 (the F32 GGUF is a row too: it checks the transport, KLD ~0);
- llama-imatrix on the calibration text, --imatrix-chunks chunks of --imatrix-ctx tokens (by default the token
  count edgeforge's recipes calibrate on, 128 x 512, taken from the start of the text);
- llama-quantize F32 -> each type, default settings otherwise (the types it picks per tensor are reported).
Bits per weight come from the GGUF's tensor types and ggml's block sizes (scales included), over the block
linears (q/k/v/o/gate/up/down), the token embedding and the output head separately.
Drift: the GGUF runs in llama.cpp through llama-cpp-python in its own venv (benchmarks/llamacpp_worker.py); each
window is one prefill from position 0 whose logits at every position come back to this process, where
edgeforge.verify's decoder measurement builds the windows from the reference tokenizer, reads the fp32
reference from verify's cache (the one `edgeforge verify` fills, so the rows pair with real_checkpoints.py's)
and computes the statistics. The GGUF tokenizer is checked to encode the evaluated documents to the same ids.
Speed (--speed): each GGUF in its own worker, the prompt and method of benchmarks/peer_decode.py (a prefill of
--prompt-tokens, then greedy decode of --decode-tokens: N - 1 single-token evals each followed by an argmax),
warm-up then rounds whose order reverses every other round; median and IQR.
Results: benchmarks/results/llamacpp_rows.json (accuracy and speed each replace only their own part) and a
Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work"
VENV = WORK / "venv-llamacpp"
DEFAULT_MODEL = WORK / "smollm2" / "hf"
DEFAULT_OUT = WORK / "llamacpp"
CALIB = WORK / "real" / "wiki-calib.txt"
EVALUATION = WORK / "real" / "wiki-eval.txt"
RESULTS = REPO / "benchmarks" / "results" / "llamacpp_rows.json"
WORKER = Path(__file__).resolve().parent / "llamacpp_worker.py"
SPEED_CTX = 512  # the KV cache of the speed runs: edgeforge's artifacts are exported with --max-seq-len 512
BLOCK_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Quant:
    """One row: ``ggml_type`` is llama-quantize's type (None: the converter's F32 file itself)."""

    name: str
    ggml_type: str | None
    imatrix: bool = False

    @property
    def stem(self) -> str:
        return self.name.replace("+", "-")


QUANTS = (Quant("F32", None), Quant("Q8_0", "Q8_0"), Quant("Q4_0", "Q4_0"), Quant("Q4_K_M", "Q4_K_M"),
          Quant("Q4_K_M+imatrix", "Q4_K_M", imatrix=True))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_tool(name: str, command: list, log: Path) -> float:
    """Run a llama.cpp tool with its output in ``log``; seconds taken, or SystemExit naming the log."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}); see {log}")
    return round(time.perf_counter() - start, 1)


def make_ggufs(model: Path, out: Path, source_sha256: str, args) -> dict:
    """The F32 GGUF, the importance matrix and every quantized GGUF in ``out``; what made them."""
    versions = json.loads((VENV / "llamacpp.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    source = out / "source.json"
    if source.exists() and json.loads(source.read_text())["sha256"] != source_sha256:
        sys.exit(f"{out}: its GGUFs were made from another checkpoint than {model}; pass another --out")
    source.write_text(json.dumps({"model": str(model), "sha256": source_sha256}) + "\n")
    steps, commands, bin_ = {}, {}, VENV / "bin"
    f32, imatrix = out / "F32.gguf", out / "imatrix.gguf"

    def make(step: str, target: Path, command: list, tool: str) -> None:
        commands[step] = " ".join(str(c) for c in command).replace(".tmp", "")
        if not target.exists():
            say(f"{step}: {commands[step]}")
            steps[f"{step}_seconds"] = run_tool(tool, command, out / f"{step}.log")
            (out / f"{target.stem}.tmp{target.suffix}").rename(target)

    make("convert", f32, [bin_ / "python", versions["convert_hf_to_gguf"], convertible(model, out), "--outtype",
                          "f32", "--outfile", out / "F32.tmp.gguf"], "convert_hf_to_gguf.py")
    for quant in sorted(QUANTS, key=lambda q: q.imatrix):  # the importance matrix (minutes) only when needed
        if quant.imatrix:
            make("imatrix", imatrix, [bin_ / "llama-imatrix", "-m", f32, "-f", args.calib, "-o",
                                      out / "imatrix.tmp.gguf", "-c", args.imatrix_ctx, "--chunks",
                                      args.imatrix_chunks, "-t", args.threads], "llama-imatrix")
        if quant.ggml_type is not None:
            make(f"quantize-{quant.stem}", out / f"{quant.stem}.gguf",
                 [bin_ / "llama-quantize", *(["--imatrix", imatrix] if quant.imatrix else []), f32,
                  out / f"{quant.stem}.tmp.gguf", quant.ggml_type, args.threads], "llama-quantize")
    return {"versions": versions, "commands": commands, "steps_this_run": steps,
            "imatrix": imatrix_facts(imatrix)}


def convertible(model: Path, out: Path) -> Path:
    """``model``, or a folder of links to its files when its tokenizer_config.json names transformers 5's
    ``TokenizersBackend``, which the converter's transformers 4.57 cannot load: there the class becomes
    ``PreTrainedTokenizerFast``, which reads the same tokenizer.json."""
    config = json.loads((model / "tokenizer_config.json").read_text()) if (model / "tokenizer_config.json").exists() \
        else {}
    if config.get("tokenizer_class") != "TokenizersBackend":
        return model
    staged = out / "hf-for-convert"
    staged.mkdir(exist_ok=True)
    for file in model.iterdir():
        if file.name != "tokenizer_config.json" and not (staged / file.name).exists():
            (staged / file.name).symlink_to(file.resolve())
    config = {key: value for key, value in config.items() if key != "backend"}
    (staged / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return staged


def imatrix_facts(path: Path) -> dict:
    """What the importance matrix file says it was computed from."""
    import gguf

    reader = gguf.GGUFReader(path)
    facts = {}
    for key in ("imatrix.chunk_count", "imatrix.chunk_size", "imatrix.datasets"):
        field = reader.get_field(key)
        if field is not None:
            facts[key] = field.contents()
    return facts


def storage(path: Path) -> dict:
    """Bits per weight by part (block linears, token embedding, output head, the rest) from the tensor types and
    ggml's block sizes: bytes = elements / block size x bytes per block, so block scales and mins count."""
    import gguf

    parts: dict[str, dict] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        fields = tensor.name.split(".")
        if fields[0] == "blk" and fields[2] in BLOCK_LINEARS and fields[-1] == "weight":
            part = "block_linears"
        elif tensor.name in ("token_embd.weight", "output.weight"):
            part = tensor.name.split(".")[0]
        else:
            part = "other"
        block, type_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        elements = int(tensor.n_elements)
        entry = parts.setdefault(part, {"elements": 0, "bytes": 0, "types": Counter()})
        entry["elements"] += elements
        entry["bytes"] += elements // block * type_bytes
        entry["types"][tensor.tensor_type.name] += 1
    for entry in parts.values():
        entry["bits_per_weight"] = 8 * entry["bytes"] / entry["elements"]
        entry["types"] = dict(entry["types"])
    parts.setdefault("output", {"tied": "token_embd"})  # no output.weight: llama.cpp reads the embedding
    return {"file_bytes": path.stat().st_size, "parts": parts}


class Worker:
    """benchmarks/llamacpp_worker.py in the llama.cpp venv; its log goes to ``log``."""

    def __init__(self, log: Path):
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115  (closed in close(), after the worker exits)
        self.process = subprocess.Popen([str(VENV / "bin" / "python"), str(WORKER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, cwd=REPO,
                                        env=dict(os.environ, OMP_NUM_THREADS="1"))

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker died; see {self.log_path}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{reply['error']} (log: {self.log_path})")
        return reply

    def logits(self, tokens: list[int]):
        import numpy as np

        reply = self.ask(op="logits", tokens=tokens)
        data = self.process.stdout.read(reply["rows"] * reply["cols"] * 4)
        return np.frombuffer(data, dtype=np.float32).reshape(reply["rows"], reply["cols"])

    def close(self) -> None:
        try:
            self.process.stdin.write(b'{"op": "quit"}\n')
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
        self.log.close()


class LlamaCppSession:
    """A GGUF in llama.cpp behind the decoder session protocol verify's runtime sessions implement."""

    def __init__(self, worker: Worker):
        self.worker = worker

    def forward(self, tokens, input_pos):
        import torch

        if tokens.shape[0] != 1 or int(input_pos[0]) != 0:
            raise ValueError("the llama.cpp session evaluates one window from position 0 at a time")
        logits = self.worker.logits(tokens[0].tolist())
        return torch.from_numpy(logits.copy())[None]


def check_tokenizer(worker: Worker, reference, documents: list[str], tokens_needed: int, gguf_meta: dict) -> dict:
    """Encode the documents verify's windows are cut from with both tokenizers and compare the id streams: the
    first ``tokens_needed`` (what the windows hold) must agree; where the streams first differ is reported."""
    tokenizer = reference.tokenizer
    ours, theirs = [], []
    for document in documents:
        ours += tokenizer.encode(document)  # exactly what verify's windows hold
        theirs += worker.ask(op="tokenize", texts=[document], add_bos=tokenizer.add_bos)["ids"][0]
        if len(ours) >= tokens_needed:
            break
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                 None if len(ours) == len(theirs) else min(len(ours), len(theirs)))
    return {"windows_tokens": tokens_needed, "windows_identical": first is None or first >= tokens_needed,
            "compared_tokens": len(ours), "gguf_tokens": len(theirs), "first_difference_at": first,
            "reference_adds_bos": tokenizer.add_bos,
            "gguf_add_bos_token": gguf_meta.get("tokenizer.ggml.add_bos_token"),
            "gguf_pre": gguf_meta.get("tokenizer.ggml.pre")}


def accuracy(model: Path, out: Path, args) -> dict:
    from peer_scoring import Evaluation

    from edgeforge.quantize.calibration import document_fingerprint, read_documents
    from edgeforge.verify.lineage import Lineage

    evaluation = Evaluation.open(model, args.data, seq_len=args.seq_len, windows=args.windows)
    reference, reference_sha256 = evaluation.reference, evaluation.context.reference_sha256
    made = make_ggufs(model, out, reference_sha256, args)
    calib_documents, calib_sha256 = read_documents(args.calib)
    calibrated = Lineage(source_sha256=reference_sha256, calibrated=True, calibration_sha256=calib_sha256,
                         calibration_fingerprints=frozenset(map(document_fingerprint, calib_documents)),
                         fingerprints_source=f"{args.calib} (the importance matrix's text)")
    rows, tokenizer_check = [], None
    for quant in (q for q in QUANTS if args.quants is None or q.name in args.quants):
        path = out / f"{quant.stem}.gguf"
        say(f"--- {quant.name}: {path}")
        worker = Worker(out / f"worker-{quant.stem}.log")
        try:
            load = worker.ask(op="load", path=str(path), n_ctx=args.seq_len, threads=args.threads, logits_all=True)
            if load["n_vocab"] != reference.config.vocab_size:
                sys.exit(f"{path}: vocabulary {load['n_vocab']}, the reference's {reference.config.vocab_size}")
            if tokenizer_check is None:
                tokenizer_check = check_tokenizer(worker, reference, evaluation.documents,
                                                  args.windows * args.seq_len, load["metadata"])
                say(f"tokenizer: the windows' {tokenizer_check['windows_tokens']} ids are "
                    f"{'' if tokenizer_check['windows_identical'] else 'NOT '}what the GGUF tokenizer gives "
                    f"(streams first differ at {tokenizer_check['first_difference_at']})")
                if not tokenizer_check["windows_identical"]:
                    sys.exit(f"{path}: its tokenizer encodes the evaluation text differently; ids would not match")
            scored = evaluation.score(LlamaCppSession(worker), path=path, scheme=quant.name, runtime="llama.cpp",
                                      max_seq_len=load["n_ctx"], lineage=calibrated if quant.imatrix else None,
                                      say=say)
        finally:
            worker.close()
        drift = scored["drift"]
        say(f"{quant.name}: KLD {drift['kld_mean_nats']:.5f} ± {drift['kld_mean_nats_sem']:.5f}, "
            f"top-1 {drift['top1_agreement']:.3f}, PPL ratio {drift['ppl_ratio']:.4f}")
        rows.append({"quant": quant.name, "ggml_type": quant.ggml_type or "F32 (convert_hf_to_gguf --outtype f32)",
                     "imatrix": quant.imatrix, "file": str(path), "metadata": load["metadata"],
                     "storage": storage(path), **scored, "runtime_versions": load["versions"]})
    return {"model": str(model), "reference_sha256": reference_sha256, "evaluation": str(args.data),
            "calibration": str(args.calib),
            "imatrix_settings": {"ctx": args.imatrix_ctx, "chunks": args.imatrix_chunks},
            **made, "tokenizer_check": tokenizer_check, "rows": rows}


def speed(model: Path, out: Path, args) -> dict:
    from peer_decode import prompt_for, spread

    prompt, ids = prompt_for(model / "tokenizer.json", args.prompt_tokens)
    quants = [q for q in QUANTS if (out / f"{q.stem}.gguf").exists()]
    if not quants:
        sys.exit(f"{out}: no GGUFs; run this script without --speed first")
    results = []
    for threads in args.speed_threads:
        say(f"--- speed, {threads} thread(s), load average {os.getloadavg()[0]:.2f}")
        workers = [Worker(out / f"speed-{q.stem}-t{threads}.log") for q in quants]
        runs = [[] for _ in quants]
        try:
            for q, w in zip(quants, workers):
                w.ask(op="load", path=str(out / f"{q.stem}.gguf"), n_ctx=SPEED_CTX, threads=threads, logits_all=False)
            for round_ in range(args.warmup + args.repetitions):
                order = list(range(len(quants)))[::-1 if round_ % 2 else 1]
                for i in order:
                    r = workers[i].ask(op="run", ids=ids, decode_tokens=args.decode_tokens)
                    if round_ >= args.warmup:
                        runs[i].append(r)
                    say(f"  round {round_ + 1} {quants[i].name}: prefill {r['prefill_ms']:.1f} ms, "
                        f"decode {r['decode_ms_per_token']:.2f} ms/token")
        finally:
            for w in workers:
                w.close()
        for q, samples in zip(quants, runs):
            results.append({"quant": q.name, "threads": threads,
                            "prefill_tok_s": spread([len(ids) * 1e3 / r["prefill_ms"] for r in samples]),
                            "decode_tok_s": spread([1e3 / r["decode_ms_per_token"] for r in samples]),
                            "samples": samples})
    return {"prompt_tokens": len(ids), "decode_tokens": args.decode_tokens, "warmup": args.warmup,
            "repetitions": args.repetitions, "runs": results}


def table(record: dict) -> str:
    speeds = {(r["quant"], r["threads"]): r for r in (record.get("speed") or {}).get("runs", [])}
    threads = sorted({t for _, t in speeds})
    head = ("| llama.cpp | bpw block linears | embedding (head tied) | file MB | KLD ± sem | same top-1 | PPL ratio |"
            + "".join(f" prefill / decode tok/s, {t}t |" for t in threads))
    lines = [head, "|" + "---|" * (7 + len(threads))]
    for row in (record.get("accuracy") or {}).get("rows", []):
        parts, d = row["storage"]["parts"], row["drift"]
        linears, embedding = parts["block_linears"], parts["token_embd"]
        cells = [row["quant"], f"{linears['bits_per_weight']:.3f} ({', '.join(sorted(linears['types']))})",
                 f"{embedding['bits_per_weight']:.2f} ({', '.join(embedding['types'])})",
                 f"{row['storage']['file_bytes'] / 1e6:.1f}",
                 f"{d['kld_mean_nats']:.5f} ± {d['kld_mean_nats_sem']:.5f}",
                 f"{d['top1_agreement']:.3f}", f"{d['ppl_ratio']:.4f} ± {d['ppl_ratio_sem']:.4f}"]
        for t in threads:
            s = speeds.get((row["quant"], t))
            cells.append(f"{s['prefill_tok_s']['median']:.0f} / {s['decode_tok_s']['median']:.1f} "
                         f"(IQR {s['decode_tok_s']['iqr']:.1f})" if s else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL, help="fp32 HF Llama directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the GGUFs and logs go")
    parser.add_argument("--calib", type=Path, default=CALIB, help="importance-matrix text")
    parser.add_argument("--data", type=Path, default=EVALUATION, help="evaluation text")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--imatrix-ctx", type=int, default=512)
    parser.add_argument("--imatrix-chunks", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="threads for the tools and the drift runs")
    parser.add_argument("--quants", type=lambda s: s.split(","), help="comma-separated rows to score "
                        f"(default: all of {', '.join(q.name for q in QUANTS)})")
    parser.add_argument("--speed", action="store_true", help="measure prefill/decode speed (only)")
    parser.add_argument("--speed-threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (VENV / ".edgeforge-peer-ready").exists():
        sys.exit(f"{VENV}: not set up; run bash benchmarks/peers/setup.sh llamacpp")
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model}: no config.json; build the shared model first (see benchmarks/real_checkpoints.py)")
    for text in (args.calib, args.data):
        if not text.exists():
            sys.exit(f"{text}: missing; benchmarks/real_checkpoints.py's split_wikitext writes it")

    from edgeforge.fileio import write_json_atomic

    part = ("speed", speed(args.model, args.out, args)) if args.speed else \
        ("accuracy", accuracy(args.model, args.out, args))
    record = json.loads(args.json.read_text()) if args.json.exists() else {}  # the other part, as it is now
    if not args.speed and args.quants is not None:  # rows not scored this time are kept
        scored = {row["quant"] for row in part[1]["rows"]}
        kept = [row for row in record.get("accuracy", {}).get("rows", []) if row["quant"] not in scored]
        order = [q.name for q in QUANTS]
        part[1]["rows"] = sorted(part[1]["rows"] + kept, key=lambda row: order.index(row["quant"]))
    record[part[0]] = part[1] | {"load_average_1m_end": os.getloadavg()[0]}
    write_json_atomic(args.json, record)
    print(table(record))


if __name__ == "__main__":
    main()
