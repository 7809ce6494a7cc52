"""llama.cpp side of benchmarks/llamacpp_rows.py: runs in benchmarks/work/venv-llamacpp (llama-cpp-python), never
in edgeforge's venv, and imports nothing of edgeforge.

Requests are JSON lines on stdin; each reply is one JSON line on the original stdout, and a ``logits`` reply is
followed by ``rows * cols`` float32 values (native byte order, row-major). llama.cpp's own output goes to stderr.

    load      {path, n_ctx, threads, logits_all}  -> {n_vocab, n_ctx, metadata, versions}
    tokenize  {texts, add_bos}                    -> {ids}: each text as llama.cpp encodes it (special tokens as text)
    logits    {tokens}                            -> {rows, cols} + the logits of every position, one prefill from 0
    run       {ids, decode_tokens}                -> prefill of ids, then greedy decode (timings in ms)
"""

from __future__ import annotations

import json
import os
import sys
import time

METADATA = ("general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


def main() -> None:
    import llama_cpp
    import numpy as np

    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    llm = None

    def argmax_last() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        return int(logits.argmax())

    for line in sys.stdin:
        request = json.loads(line)
        payload = b""
        try:
            if request["op"] == "load":
                threads = request["threads"]
                llm = llama_cpp.Llama(model_path=request["path"], n_ctx=request["n_ctx"], n_batch=request["n_ctx"],
                                      n_ubatch=request["n_ctx"], n_threads=threads, n_threads_batch=threads,
                                      logits_all=request["logits_all"], verbose=False)
                reply = {"n_vocab": llm.n_vocab(), "n_ctx": llm.n_ctx(),
                         "metadata": {key: llm.metadata.get(key) for key in METADATA},
                         "versions": {"llama_cpp_python": llama_cpp.__version__,
                                      "system_info": llama_cpp.llama_print_system_info().decode().strip()}}
            elif request["op"] == "tokenize":
                reply = {"ids": [llm.tokenize(text.encode("utf-8"), add_bos=request["add_bos"], special=False)
                                 for text in request["texts"]]}
            elif request["op"] == "logits":
                tokens = request["tokens"]
                llm.reset()
                llm.eval(tokens)
                scores = np.ascontiguousarray(llm.scores[:len(tokens)], dtype=np.float32)
                reply, payload = {"rows": scores.shape[0], "cols": scores.shape[1]}, scores.tobytes()
            elif request["op"] == "run":
                ids, steps = request["ids"], request["decode_tokens"] - 1  # the first token comes from the prefill
                llm.reset()
                start = time.perf_counter()
                llm.eval(ids)
                token = argmax_last()
                prefill = time.perf_counter() - start
                for _ in range(steps):
                    llm.eval([token])
                    token = argmax_last()
                decode = time.perf_counter() - start - prefill
                reply = {"prompt_tokens": len(ids), "generated_tokens": steps + 1, "prefill_ms": prefill * 1e3,
                         "decode_ms_per_token": decode * 1e3 / steps}
            elif request["op"] == "quit":
                break
            else:
                reply = {"error": f"unknown op {request['op']}"}
        except Exception as exc:  # noqa: BLE001  (reported to the parent, which decides)
            reply, payload = {"error": f"{type(exc).__name__}: {exc}"}, b""
        channel.write(json.dumps(reply).encode() + b"\n" + payload)
        channel.flush()


if __name__ == "__main__":
    main()
