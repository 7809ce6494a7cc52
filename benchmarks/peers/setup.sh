#!/usr/bin/env bash
# Virtual environments for the peer exporters that benchmarks/peer_decode.py compares against.
#
#   bash benchmarks/peers/setup.sh            # both
#   bash benchmarks/peers/setup.sh optimum    # only optimum-executorch
#   bash benchmarks/peers/setup.sh ortgenai   # only the onnxruntime-genai model builder
#
# The peers pin other transformers versions than edgeforge, so each lives in its own venv under
# benchmarks/work/ (git ignores it) and is never a dependency of edgeforge. Idempotent: a venv whose
# marker file exists is left alone (delete the folder to rebuild it).
#
# torch: every venv gets the CPU build torch==2.13.0 first (the version edgeforge's venv uses), and every
# later install runs under a constraint file that holds it there, so pip can never swap in a CUDA build.
#   * optimum-executorch 1.1.0 requires transformers==5.0.0rc1, optimum~=2.0.0 and executorch>=1.0.0.
#     Unconstrained, pip would take executorch 1.5.x, whose native libraries link libtorch and are
#     built for torch 2.14 (only a CUDA wheel of which is reachable here), so executorch is held below
#     1.5: 1.4.x is built for torch 2.13 (`torch>=2.13.0a0`), and satisfies the peer's own pin.
#   * the onnxruntime-genai builder (python -m onnxruntime_genai.models.builder) declares no
#     requirements of its own; its test requirements ask for transformers>=5, onnx, onnx_ir and torch.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$REPO/benchmarks/work"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
OPTIMUM_EXECUTORCH_VERSION="${OPTIMUM_EXECUTORCH_VERSION:-1.1.0}"
EXECUTORCH_SPEC="${EXECUTORCH_SPEC:-executorch>=1.4,<1.5}"
ORT_GENAI_VERSION="${ORT_GENAI_VERSION:-0.18.0}"

mkdir -p "$WORK"
CONSTRAINTS="$WORK/peer-constraints.txt"
printf 'torch==%s\n' "$TORCH_VERSION" > "$CONSTRAINTS"

new_venv() {  # new_venv DIR: a fresh venv with pip and the CPU torch
    local dir="$1"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install "torch==$TORCH_VERSION"
    "$dir/bin/python" - <<'EOF'
import torch
assert torch.version.cuda is None, f"a CUDA torch was installed: {torch.__version__}"
print("torch", torch.__version__, "(CPU)")
EOF
}

setup_optimum() {
    local dir="$WORK/venv-optimum-executorch"
    if [[ -f "$dir/.edgeforge-peer-ready" ]]; then echo "$dir: ready"; return; fi
    new_venv "$dir"
    "$dir/bin/pip" install -c "$CONSTRAINTS" "optimum-executorch==$OPTIMUM_EXECUTORCH_VERSION" "$EXECUTORCH_SPEC"
    "$dir/bin/python" -c "import torch, executorch, transformers, optimum.exporters.executorch; print('ok')"
    "$dir/bin/pip" freeze > "$dir/freeze.txt"
    touch "$dir/.edgeforge-peer-ready"
}

setup_ortgenai() {
    local dir="$WORK/venv-ort-genai-builder"
    if [[ -f "$dir/.edgeforge-peer-ready" ]]; then echo "$dir: ready"; return; fi
    new_venv "$dir"
    "$dir/bin/pip" install -c "$CONSTRAINTS" "onnxruntime-genai==$ORT_GENAI_VERSION" onnxruntime \
        "transformers>=5" onnx onnx-ir tqdm
    "$dir/bin/python" -c "import onnxruntime_genai, onnxruntime, transformers, onnx, onnx_ir, torch; print('ok')"
    "$dir/bin/pip" freeze > "$dir/freeze.txt"
    touch "$dir/.edgeforge-peer-ready"
}

case "${1:-all}" in
    optimum) setup_optimum ;;
    ortgenai) setup_ortgenai ;;
    all) setup_optimum; setup_ortgenai ;;
    *) echo "usage: $0 [all|optimum|ortgenai]" >&2; exit 2 ;;
esac
