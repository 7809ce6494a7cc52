#!/usr/bin/env bash
# Export the random SmolLM-135M-shaped Llama with each peer, from the peer's own venv
# (benchmarks/peers/setup.sh makes them), for benchmarks/peer_decode.py.
#
#   bash benchmarks/peers/export.sh            # both (an output that exists is kept)
#   bash benchmarks/peers/export.sh optimum    # benchmarks/work/peer-optimum-8da4w/model.pte
#   bash benchmarks/peers/export.sh ortgenai   # benchmarks/work/peer-ortgenai-int4/model.onnx + genai_config.json
#   FORCE=1 bash benchmarks/peers/export.sh    # re-export
#
# Settings chosen to match edgeforge's artifacts (recipe int4-xnnpack: 8da4w, group 32, int8 embedding;
# export --max-seq-len 512):
#   optimum-executorch: xnnpack recipe, custom SDPA + custom KV cache (the ops edgeforge's .pte uses),
#     linears 8da4w (group 32, the peer's default: its CLI's --qlinear_group_size is not forwarded by
#     the text-generation task in 1.1.0), embedding 8w per row, static cache of 512.
#   onnxruntime-genai builder: int4 for the CPU EP, block 32, accuracy_level 4 (int8 activations inside
#     MatMulNBits: the analogue of 8da4w), symmetric (the default). The builder has no max-length
#     option: its genai_config.json says context_length = max_position_embeddings (2048); the harness
#     caps max_length at 512 for every ONNX model.
# Only local files are read (HF_HUB_OFFLINE=1); the checkpoint is made if missing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$REPO/benchmarks/work"
SRC="${SRC:-$WORK/smol-135m-random}"
MAX_SEQ_LEN="${MAX_SEQ_LEN:-512}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ ! -f "$SRC/config.json" ]]; then
    "$REPO/.venv/bin/python" "$REPO/benchmarks/make_llama_checkpoint.py" --preset 135m "$SRC"
fi

export_optimum() {
    local venv="$WORK/venv-optimum-executorch" out="$WORK/peer-optimum-8da4w"
    if [[ -f "$out/model.pte" && -z "${FORCE:-}" ]]; then echo "$out: exists"; return; fi
    [[ -x "$venv/bin/optimum-cli" ]] || { echo "run benchmarks/peers/setup.sh optimum first" >&2; exit 1; }
    rm -rf "$out.tmp"
    local start=$SECONDS
    "$venv/bin/optimum-cli" export executorch \
        --model "$SRC" \
        --task text-generation \
        --recipe xnnpack \
        --use_custom_sdpa \
        --use_custom_kv_cache \
        --qlinear 8da4w \
        --qlinear_group_size 32 \
        --qembedding 8w \
        --max_seq_len "$MAX_SEQ_LEN" \
        --output_dir "$out.tmp"
    # the LLM runner reads a tokenizer.json; the peer writes only the .pte
    cp "$SRC/tokenizer.json" "$SRC/tokenizer_config.json" "$out.tmp/"
    echo "optimum-executorch export: $((SECONDS - start)) s" | tee "$out.tmp/export.log"
    rm -rf "$out"; mv "$out.tmp" "$out"
}

export_ortgenai() {
    local venv="$WORK/venv-ort-genai-builder" out="$WORK/peer-ortgenai-int4"
    if [[ -f "$out/genai_config.json" && -z "${FORCE:-}" ]]; then echo "$out: exists"; return; fi
    [[ -x "$venv/bin/python" ]] || { echo "run benchmarks/peers/setup.sh ortgenai first" >&2; exit 1; }
    rm -rf "$out.tmp"
    local start=$SECONDS
    "$venv/bin/python" -m onnxruntime_genai.models.builder \
        -i "$SRC" \
        -o "$out.tmp" \
        -p int4 \
        -e cpu \
        -c "$WORK/ortgenai-cache" \
        --extra_options block_size=32 accuracy_level=4 hf_token=false
    echo "onnxruntime-genai builder export: $((SECONDS - start)) s" | tee "$out.tmp/export.log"
    rm -rf "$out"; mv "$out.tmp" "$out"
}

case "${1:-all}" in
    optimum) export_optimum ;;
    ortgenai) export_ortgenai ;;
    all) export_optimum; export_ortgenai ;;
    *) echo "usage: $0 [all|optimum|ortgenai]" >&2; exit 2 ;;
esac
