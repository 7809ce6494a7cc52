"""Accuracy rows of the peers users would pick instead of edgeforge, on a real checkpoint: onnxruntime-genai's
model builder (int4, int8), optimum-executorch (xnnpack 8da4w) and torchao's round-to-nearest ``quantize_``,
scored by edgeforge's own verify statistics on the windows and fp32 reference real_checkpoints.py's rows use.

    bash benchmarks/peers/setup.sh optimum && bash benchmarks/peers/setup.sh ortgenai   # the peers' venvs
    python benchmarks/peer_rows.py                    # export each peer, run it, score it (an hour on 2 busy cores)
    python benchmarks/peer_rows.py --peers ortgenai-int4,torchao-8da4w-g32

Default checkpoint: the shared SmolLM2-135M (fp32 HF; benchmarks/real_checkpoints.py says how to build it);
evaluation text: the WikiText-2 part real_checkpoints.py's split_wikitext holds out (no peer calibrates).
Each exporter runs from its own venv with the settings in PEERS (the peer's defaults: these are not the
matched settings benchmarks/peers/export.sh gives peer_decode.py), as a child whose wall time and peak RSS
(``wait4``) are recorded; an export that exists in --out is kept. Each artifact then runs in its runtime from
this (edgeforge's) venv: the ONNX through onnxruntime (edgeforge's ONNX decoder session: input_ids,
attention_mask, position_ids and empty past keys/values; logits of every position), the .pte through
``executorch.runtime`` (edgeforge's .pte decoder session: input_ids [1, S] and cache_position [S]; a 3-token
probe checks that the program returns the logits of every position), each 256-token window one prefill from
position 0. torchao's rows are eager: quantize_ on
edgeforge's fp32 model (every nn.Linear, the tied head included, as optimum quantizes; the embedding stays
fp32), timed as their "export". Scoring: benchmarks/peer_scoring.py (verify's decoder measurement and cache).
Bits per weight count what the artifact stores for the block linears (q/k/v/o/gate/up/down), scales and zero
points included, and the head and embedding apart: ONNX from the MatMulNBits/Gather initializers, the .pte
from its XNNPACK payloads' tensor shapes, types and the byte sizes of their constant data, torchao from its
tensors (int4 counted as 4 bits, though eager torchao holds one per int8).
Results: benchmarks/results/peer_rows.json and a Markdown table on stdout (benchmarks/README.md has it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgeforge.errors import EdgeforgeError

import peer_scoring

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work"
DEFAULT_MODEL = WORK / "smollm2" / "hf"
DEFAULT_OUT = WORK / "peer-rows"
EVALUATION = WORK / "real" / "wiki-eval.txt"
RESULTS = REPO / "benchmarks" / "results" / "peer_rows.json"


@dataclass(frozen=True)
class Peer:
    """One row. ``command``: the exporter's argv after the venv's bin/ (``{src}``, ``{out}``, ``{cache}`` filled
    in); None for a torchao row, whose ``torchao`` names its config."""

    name: str
    format: str  # "onnx" | "pte" | "eager"
    settings: str
    venv: str | None = None
    command: tuple[str, ...] | None = None
    torchao: str | None = None


BUILDER = ("python", "-m", "onnxruntime_genai.models.builder", "-i", "{src}", "-o", "{out}", "-e", "cpu",
           "-c", "{cache}")
PEERS = (
    Peer("ortgenai-int4", "onnx", "builder -p int4 -e cpu (defaults: RTN)", "venv-ort-genai-builder",
         (*BUILDER, "-p", "int4")),
    Peer("ortgenai-fp32", "onnx", "builder -p fp32 -e cpu (transport check: expect KLD ~0)",
         "venv-ort-genai-builder", (*BUILDER, "-p", "fp32")),
    Peer("ortgenai-int8", "onnx", "builder -p int8 -e cpu (defaults)", "venv-ort-genai-builder",
         (*BUILDER, "-p", "int8")),
    Peer("optimum-8da4w", "pte", "optimum-cli --recipe xnnpack --qlinear 8da4w (defaults: g32, hqq_scale_only "
         "scales, fp32 embedding, max_seq_len 2048)", "venv-optimum-executorch",
         ("optimum-cli", "export", "executorch", "--model", "{src}", "--task", "text-generation", "--recipe",
          "xnnpack", "--qlinear", "8da4w", "--output_dir", "{out}")),
    Peer("torchao-8da4w-g32", "eager", "quantize_(Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32))), RTN",
         torchao="8da4w"),
    Peer("torchao-int4wo-g32", "eager", "quantize_(IntxWeightOnlyConfig(int4, PerGroup(32))), RTN",
         torchao="int4wo"),
    Peer("torchao-8da8w", "eager", "quantize_(Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0))), RTN",
         torchao="8da8w"),
)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export(peer: Peer, model: Path, out: Path) -> dict:
    """Run the peer's exporter into ``out/<name>`` (kept when it exists); what ran, its wall time and peak RSS."""
    target, record_file = out / peer.name, out / peer.name / "export.json"
    if record_file.exists():
        return json.loads(record_file.read_text())
    venv = WORK / peer.venv
    if not (venv / ".edgeforge-peer-ready").exists():
        raise RuntimeError(f"{venv} is not set up: run bash benchmarks/peers/setup.sh")
    tmp = out / f"{peer.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    argv = [str(venv / "bin" / peer.command[0]),
            *(part.format(src=model, out=tmp, cache=out / "ortgenai-cache") for part in peer.command[1:])]
    say(f"{peer.name}: {' '.join(argv)}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    with open(out / f"{peer.name}.export.log", "w") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage: its peak RSS, not this process's
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"exit {child.returncode}; see {out / f'{peer.name}.export.log'}")
    record = {"argv": argv, "seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
              "load_average_1m": os.getloadavg()[0]}
    (tmp / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return record


def onnx_storage(directory: Path) -> dict:
    """Bytes and weights per part from the ONNX graph's MatMulNBits / GatherBlockQuantized nodes: packed weights,
    scales and zero points as their initializers' dtypes and shapes say (external data is not read)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    sizes = {t.name: helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * _product(t.dims)
             for t in graph.initializer}
    parts: dict[str, dict] = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        part = "head" if node.name.startswith("/lm_head/") else ("block_linears" if "/layers." in node.name
                                                                  else "other")
        entry = parts.setdefault(part, {"elements": 0, "bytes": 0, "nodes": 0, "settings": set()})
        entry["elements"] += attributes["K"] * attributes["N"]
        entry["bytes"] += sum(sizes.get(name, 0) for name in node.input[1:])  # B, scales, zero points (g_idx)
        entry["nodes"] += 1
        entry["settings"].add(f"{attributes['bits']} bits, block {attributes['block_size']}, accuracy_level "
                              f"{attributes.get('accuracy_level', 0)}, zero points "
                              f"{'yes' if len(node.input) > 3 and node.input[3] else 'no'}")
    embedding = next((n for n in graph.node if n.name.startswith("/model/embed_tokens/")
                      and n.op_type in ("Gather", "GatherBlockQuantized")), None)
    if embedding is not None:
        head = {name for n in graph.node if n.name.startswith("/lm_head/") for name in n.input if name in sizes}
        producers = {output: n for n in graph.node for output in n.output}
        sources = set(embedding.input) | {name for i in embedding.input if i in producers
                                          for name in producers[i].input}  # through a Reshape of the head's
        parts["embedding"] = {"op": embedding.op_type, "tied_to_head": bool(sources & head),
                              "bytes_not_shared": sum(sizes[name] for name in sources - head if name in sizes)}
    for entry in parts.values():
        if "elements" in entry:
            entry["bits_per_weight"] = 8 * entry["bytes"] / entry["elements"]
            entry["settings"] = sorted(entry["settings"])
    return {"file_bytes": sum(f.stat().st_size for f in directory.glob("model.onnx*")), "parts": parts}


def pte_storage(pte: Path, config) -> dict:
    """Bytes and weights per part from the .pte's XNNPACK payloads: every FullyConnected's filter tensor (dims,
    datatype) and the sizes of its constant data and of its scales' buffer (the named data they point at). A filter
    of the head's shape is the head, one of a block linear's shape (``config``: the LlamaConfig) a block linear;
    anything else (a constant RoPE matmul, say) is "other"."""
    import tempfile

    from executorch.backends.xnnpack.serialization import xnnpack_graph_serialize as xnn
    from executorch.exir._serialize import _flatbuffer, _program

    data = pte.read_bytes()
    schema = Path(xnn.__file__).with_name("schema.fbs")
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    block_shapes = {(q, config.dim), (kv, config.dim), (config.dim, q), (config.hidden_dim, config.dim),
                    (config.dim, config.hidden_dim)}
    parts: dict[str, dict] = {}
    delegates = 0
    while (payload := _program._extract_delegate_payload(data, "xnnpack", delegates)) is not None:
        delegates += 1
        header = xnn.XNNHeader.from_bytes(payload[:xnn.XNNHeader.EXPECTED_LENGTH])
        with tempfile.TemporaryDirectory() as tmp:
            binary = Path(tmp) / "graph.bin"
            binary.write_bytes(payload[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size])
            _flatbuffer._flatc_decompile(tmp, str(schema), str(binary), ["--raw-binary"])
            graph = json.loads(_flatbuffer._replace_infinity_in_json_file((Path(tmp) / "graph.json").read_bytes()))
        constants = graph["constant_data"]
        for node in graph["xnodes"]:
            if node["xnode_union_type"] != "XNNFullyConnected":
                continue
            value = graph["xvalues"][node["xnode_union"]["filter_id"]]
            tensor = value["xvalue_union"].get("tensor_value", value["xvalue_union"])
            quant = value["xvalue_union"].get("quant_params") or {}
            out_features, in_features = tensor["dims"]
            scale_buffer = quant.get("scale_buffer_idx", 0)
            size = constants[tensor["constant_buffer_idx"]]["size"] + (constants[scale_buffer]["size"]
                                                                       if scale_buffer else 4 * len(quant.get("scale", [])))
            part = ("head" if out_features == config.vocab_size else
                    "block_linears" if (out_features, in_features) in block_shapes else "other")
            entry = parts.setdefault(part, {"elements": 0, "bytes": 0, "nodes": 0, "settings": set()})
            entry["elements"] += out_features * in_features
            entry["bytes"] += size
            entry["nodes"] += 1
            entry["settings"].add(f"{tensor['datatype']}, group {quant.get('group_size', 'per channel')}")
    for entry in parts.values():
        entry["bits_per_weight"] = 8 * entry["bytes"] / entry["elements"]
        entry["settings"] = sorted(entry["settings"])
    return {"file_bytes": pte.stat().st_size, "xnnpack_delegates": delegates, "parts": parts}


def torchao_storage(model) -> dict:
    """Bytes and weights per part from torchao's tensors: values at the target width, scales and zero points as
    they are held; the fp32 embedding apart."""
    from edgeforge.quantize.record import is_block_layer

    parts: dict[str, dict] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not hasattr(weight, "qdata"):
            continue
        bits = {"torch.int4": 4, "torch.int8": 8}[str(weight.target_dtype)]
        entry = parts.setdefault("block_linears" if is_block_layer(name) else "head",
                                 {"elements": 0, "bytes": 0, "nodes": 0})
        entry["elements"] += weight.qdata.numel()
        entry["bytes"] += weight.qdata.numel() * bits / 8 + sum(
            getattr(weight, n).numel() * getattr(weight, n).element_size() for n in ("scale", "zero_point"))
        entry["nodes"] += 1
    for entry in parts.values():
        entry["bits_per_weight"] = 8 * entry["bytes"] / entry["elements"]
    embedding = model.tok_embeddings.weight
    parts["embedding"] = {"bytes": embedding.numel() * embedding.element_size(), "dtype": str(embedding.dtype)}
    return {"file_bytes": None, "parts": parts}


def _product(dims) -> int:
    total = 1
    for dim in dims:
        total *= dim
    return total


class _DeclaredInputs:
    """An onnxruntime session fed only the inputs its graph declares: the builder's graph takes no position_ids
    (GroupQueryAttention derives positions from the attention mask), which edgeforge's decoder session feeds."""

    def __init__(self, session):
        self.session, self.names = session, {i.name for i in session.get_inputs()}

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, output_names, feeds):
        return self.session.run(output_names, {k: v for k, v in feeds.items() if k in self.names})


def same_vocabulary(tokenizer_json: Path, reference: Path) -> dict:
    """Whether the peer's tokenizer.json maps tokens to the reference's ids (vocab, merges and added tokens)."""
    ours, theirs = (json.loads(p.read_text()) for p in (reference / "tokenizer.json", tokenizer_json))
    fields = {"vocab": lambda t: t["model"]["vocab"], "merges": lambda t: t["model"].get("merges"),
              "added_tokens": lambda t: [(a["id"], a["content"]) for a in t["added_tokens"]]}
    return {name: get(ours) == get(theirs) for name, get in fields.items()} | {"file": str(tokenizer_json)}


def torchao_config(name: str):
    """torchao's config for a torchao row: round-to-nearest (torchao's default "affine" qparams), symmetric."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    return {"8da4w": lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                    weight_granularity=PerGroup(32)),
            "int4wo": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
            "8da8w": lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                                    weight_granularity=PerAxis(0))}[name]()


def open_peer(peer: Peer, directory: Path, reference, threads: int) -> dict:
    """The peer's model in its runtime (``session``) and what its artifact stores, checked and counted."""
    config = reference.config
    if peer.format == "onnx":
        from edgeforge.export.onnx.session import OnnxDecoderSession, inference_session

        session = OnnxDecoderSession(_DeclaredInputs(inference_session(directory / "model.onnx", threads=threads)),
                                     n_layers=config.n_layers, n_kv_heads=config.n_kv_heads,
                                     head_dim=config.head_dim, max_seq_len=config.max_seq_len)
        return {"session": session, "path": directory, "max_seq_len": config.max_seq_len,
                "storage": onnx_storage(directory),
                "vocabulary": same_vocabulary(directory / "tokenizer.json", reference.path)}
    if peer.format == "pte":
        import torch

        from edgeforge.export.executorch.session import DecoderSession, load_method

        pte = directory / "model.pte"
        max_seq_len = int(load_method(pte, "get_max_seq_len").execute([])[0])
        session = DecoderSession(pte, max_seq_len=max_seq_len)
        probe = session.forward(torch.zeros(1, 3, dtype=torch.long), torch.arange(3))
        if probe.shape != (1, 3, config.vocab_size):  # scoring needs every position's logits from one prefill
            raise RuntimeError(f"{pte}: a 3-token prefill returned logits {tuple(probe.shape)}, not (1, 3, vocab)")
        return {"session": session, "path": pte, "max_seq_len": max_seq_len,
                "storage": pte_storage(pte, config),
                "vocabulary": "no tokenizer in the .pte: its embedding is the checkpoint's, indexed by the same ids"}
    import torch
    from torchao.quantization import quantize_

    from edgeforge.checkpoints import load_model
    from edgeforge.verify.models import EagerSession

    model = load_model(reference)
    start = time.perf_counter()
    quantize_(model, torchao_config(peer.torchao), lambda module, fqn: isinstance(module, torch.nn.Linear))
    seconds = time.perf_counter() - start
    return {"session": EagerSession(model, max_seq_len=config.max_seq_len), "path": reference.path,
            "max_seq_len": config.max_seq_len, "storage": torchao_storage(model),
            "vocabulary": "the reference model itself", "export": {"seconds": round(seconds, 1),
                                                                   "peak_rss_bytes": None, "argv": None}}


def run_row(peer: Peer, evaluation, args) -> dict:
    row = {"peer": peer.name, "format": peer.format, "peer_settings": peer.settings}
    try:
        if peer.command is not None:
            row["export"] = export(peer, args.model, args.out)
        opened = open_peer(peer, args.out / peer.name, evaluation.reference, args.threads)
        row.update({key: opened[key] for key in ("storage", "vocabulary", "max_seq_len")})
        row.setdefault("export", opened.get("export"))
        say(f"{peer.name}: scoring {opened['path']} ...")
        row.update(evaluation.score(opened["session"], path=opened["path"], scheme=peer.name,
                                    runtime=peer.format,
                                    max_seq_len=opened["max_seq_len"], say=say))
    except (RuntimeError, EdgeforgeError) as exc:  # recorded in the row; the other peers still run
        row["failed"] = str(exc)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| peer | format | settings | bpw block linears (head) | file MB | KLD ± sem | same top-1 | PPL ratio | "
             "export s | export peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['peer']} | {row['format']} | {row['peer_settings']} | failed: {row['failed']} ||||||")
            continue
        parts, d, made = row["storage"]["parts"], row["drift"], row.get("export") or {}
        bits = [parts.get(part, {}).get("bits_per_weight") for part in ("block_linears", "head")]
        bits_text = "fp32" if bits[0] is None else f"{bits[0]:.3f} ({bits[1]:.3f})"
        size = row["storage"]["file_bytes"]
        rss = made.get("peak_rss_bytes")
        lines.append(f"| {row['peer']} | {row['format']} | {row['peer_settings']} | {bits_text} | "
                     f"{'' if size is None else f'{size / 1e6:.1f}'} | "
                     f"{d['kld_mean_nats']:.4g} ± {d['kld_mean_nats_sem']:.2g} | "
                     f"{d['top1_agreement']:.3f} | {d['ppl_ratio']:.4f} ± {d['ppl_ratio_sem']:.4f} | "
                     f"{made.get('seconds', 0):.0f} | {'' if rss is None else f'{rss / 1e6:.0f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL, help="fp32 HF Llama directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the peers' artifacts go")
    parser.add_argument("--data", type=Path, default=EVALUATION, help="evaluation text")
    parser.add_argument("--peers", help="comma-separated (default: all of " + ", ".join(p.name for p in PEERS) + ")")
    parser.add_argument("--export-only", action="store_true", help="only run the exporters")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2, help="runtime threads (onnxruntime intra-op)")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model}: no config.json; build the shared model first (see benchmarks/real_checkpoints.py)")
    if not args.data.exists():
        sys.exit(f"{args.data}: missing; benchmarks/real_checkpoints.py's split_wikitext writes it")
    chosen = [p for p in PEERS if not args.peers or p.name in args.peers.split(",")]
    if args.export_only:
        for peer in chosen:
            if peer.command is not None:
                export(peer, args.model, args.out)
        return

    from edgeforge.fileio import write_json_atomic
    from edgeforge.quiet import third_party_quiet
    from peer_decode import peer_versions

    record = json.loads(args.json.read_text()) if args.json.exists() else {"rows": []}
    with third_party_quiet():
        evaluation = peer_scoring.Evaluation.open(args.model, args.data, seq_len=args.seq_len, windows=args.windows)
        for peer in chosen:
            row = run_row(peer, evaluation, args)
            record["rows"] = [r for r in record["rows"] if r["peer"] != peer.name] + [row]
            record.update(model=str(args.model), reference_sha256=evaluation.context.reference_sha256,
                          evaluation=str(args.data), seq_len=args.seq_len, windows=args.windows,
                          versions={"peers": peer_versions(), "here": runtime_versions()},
                          load_average_1m=os.getloadavg()[0])
            write_json_atomic(args.json, record)
            say(table([row]).splitlines()[-1])
    order = [p.name for p in PEERS]
    print(table(sorted(record["rows"], key=lambda r: order.index(r["peer"]) if r["peer"] in order else len(order))))


def runtime_versions() -> dict:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("edgeforge", "torch", "torchao", "executorch", "onnxruntime")}


if __name__ == "__main__":
    main()
