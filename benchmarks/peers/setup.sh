#!/usr/bin/env bash
# Virtual environments for the peer exporters that benchmarks/peer_decode.py compares against.
#
#   bash benchmarks/peers/setup.sh            # both
#   bash benchmarks/peers/setup.sh optimum    # only optimum-executorch
#   bash benchmarks/peers/setup.sh ortgenai   # only the onnxruntime-genai model builder
#   bash benchmarks/peers/setup.sh llamacpp   # only llama.cpp (llama-cpp-python, llama-quantize, llama-imatrix)
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
#   * llama.cpp: llama-cpp-python is built from its sdist (CPU only, about 5 minutes on 2 cores), and
#     llama-quantize / llama-imatrix are built with cmake from the llama.cpp tree that sdist vendors, so
#     the tools, the binding, convert_hf_to_gguf.py and the gguf package all come from one llama.cpp
#     commit (the sdist's CHANGELOG names it; it has no .git, so the build reports commit "unknown").
#     The converter's own requirements pin transformers 4.57.6.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$REPO/benchmarks/work"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
OPTIMUM_EXECUTORCH_VERSION="${OPTIMUM_EXECUTORCH_VERSION:-1.1.0}"
EXECUTORCH_SPEC="${EXECUTORCH_SPEC:-executorch>=1.4,<1.5}"
ORT_GENAI_VERSION="${ORT_GENAI_VERSION:-0.18.0}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

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

setup_llamacpp() {
    local dir="$WORK/venv-llamacpp" src="$WORK/llamacpp-src"
    if [[ -f "$dir/.edgeforge-peer-ready" ]]; then echo "$dir: ready"; return; fi
    new_venv "$dir"
    rm -rf "$src" && mkdir -p "$src"
    "$dir/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$src"
    tar -xzf "$src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$src"
    local pkg="$src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
    local commit
    commit="$(sed -n 's/.*update llama.cpp to ggml-org\/llama.cpp@\([0-9a-f]*\).*/\1/p' "$pkg/CHANGELOG.md" | head -n 1)"
    local cpu_only=(-DGGML_CUDA=OFF -DGGML_HIP=OFF -DGGML_VULKAN=OFF -DGGML_SYCL=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF)
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
    cmake -S "$pkg/vendor/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMIT="$commit" "${cpu_only[@]}"
    cmake --build "$src/build" --config Release --target llama-quantize llama-imatrix
    cp "$src/build/bin/llama-quantize" "$src/build/bin/llama-imatrix" "$dir/bin/"
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_COMMIT=$commit ${cpu_only[*]}" \
        "$dir/bin/pip" install -c "$CONSTRAINTS" "$pkg"
    "$dir/bin/pip" install -c "$CONSTRAINTS" "$pkg/vendor/llama.cpp/gguf-py" "transformers==4.57.6" \
        "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21.0,<5.0.0"
    "$dir/bin/python" -c "import llama_cpp, gguf, transformers, torch; print('llama-cpp-python', llama_cpp.__version__)"
    # what benchmarks/llamacpp_rows.py reads: the binding's version, the llama.cpp commit, the converter
    printf '{"llama_cpp_python": "%s", "llama_cpp_commit": "%s", "convert_hf_to_gguf": "%s"}\n' \
        "$LLAMA_CPP_PYTHON_VERSION" "$commit" "$pkg/vendor/llama.cpp/convert_hf_to_gguf.py" > "$dir/llamacpp.json"
    "$dir/bin/pip" freeze > "$dir/freeze.txt"
    touch "$dir/.edgeforge-peer-ready"
}

case "${1:-all}" in
    optimum) setup_optimum ;;
    ortgenai) setup_ortgenai ;;
    llamacpp) setup_llamacpp ;;
    all) setup_optimum; setup_ortgenai; setup_llamacpp ;;
    *) echo "usage: $0 [all|optimum|ortgenai|llamacpp]" >&2; exit 2 ;;
esac
