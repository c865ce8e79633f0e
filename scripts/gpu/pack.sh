#!/bin/bash
# Builds what the GPU machine needs to run vLLM 0.26.0 (python 3.12, torch 2.11.0+cu130 preinstalled there).
# Usage: pack.sh OUT_DIR   (e.g. .devcarry, ignored by git; copy it to the GPU machine with the repo)
# Writes OUT_DIR/p1s.tar.xz (vllm/_C_stable_libtorch.abi3.so with non-sm_90 GPU code zeroed, ~31 MiB) and
#        OUT_DIR/p2s.tar.xz (trimmed vllm + the dependencies the device lacks, ~28 MiB): together < 64 MiB.
# Needs network to PyPI (this machine has it; the device has none) and ~2 GB in $WORK. Takes a few minutes.
set -euo pipefail
OUT=$(mkdir -p "${1:?usage: pack.sh OUT_DIR}" && cd "$1" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-/tmp/vllm_gpu_pack}; mkdir -p "$WORK"; cd "$WORK"
PLAT=""; for n in 5 12 17 24 26 27 28 31 34 35; do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done
PLAT="$PLAT --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
PIPDL="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none $PLAT --platform any"
mkdir -p vllmwhl whl
$PIPDL -d vllmwhl vllm==0.26.0
# Dependencies missing from the device image that the OpenAI server needs (versions: vllm 0.26.0's resolution).
# xgrammar needs apache-tvm-ffi at import; openai 3.x needs httpx2/httpcore2/truststore.
# Left out on purpose (not needed for dense bf16 models on /v1/completions and /v1/chat/completions):
# flashinfer, cutlass-dsl, tilelang, mistral-common, anthropic, mcp, OTLP exporters, outlines-core.
cat > deps.txt <<'DEPS'
annotated-types==0.8.0
anyio==4.16.0
apache-tvm-ffi==0.1.10
astor==0.8.1
blake3==1.0.11
cachetools==8.0.2
cbor2==6.3.0
compressed-tensors==0.17.0
depyf==0.20.0
dill==0.4.1
dnspython==2.9.2
docstring-parser==0.18.0
email-validator==2.4.0
fastapi==0.136.3
h11==0.16.0
httpcore2==2.16.2
httptools==0.9.0
httpx2==2.16.2
ijson==3.6.0
interegular==0.3.3
jiter==0.19.0
jmespath==1.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
lark==1.2.2
llguidance==1.7.6
lm-format-enforcer==0.11.3
loguru==0.7.3
model-hosting-container-standards==0.1.16
msgspec==0.22.0
nvtx==0.2.15
openai==3.57.0
openai-harmony==0.0.8
opentelemetry-api==1.45.2
opentelemetry-semantic-conventions==0.66b2
opentelemetry-semantic-conventions-ai==0.5.1
partial-json-parser==0.2.1.1.post7
prometheus-fastapi-instrumentator==8.1.0
pybase64==1.5.1
pydantic==2.14.4
pydantic-core==2.50.5
pydantic-settings==2.16.3
python-dotenv==1.2.4
python-json-logger==4.2.0
python-multipart==0.0.34
pyzmq==27.3.0
referencing==0.37.0
rpds-py==2026.9.1
setproctitle==1.3.8
sniffio==1.3.1
sse-starlette==3.7.0
starlette==1.10.0
supervisor==4.3.0
truststore==0.10.5
typing-inspection==0.4.5
uvicorn==0.54.0
watchfiles==1.3.0
websockets==17.4
xgrammar==0.2.7
DEPS
$PIPDL -d whl -r deps.txt
rm -rf site && python3 -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: \
  --python-version 3.12 --implementation cp $PLAT --target site whl/*.whl vllmwhl/vllm-0.26.0-*.whl
( cd site
  # FA2 is for pre-Hopper GPUs (FA3 is kept and used on the H200); MoE kernels are an optional import;
  # vllm-rs is the optional Rust frontend; cutlass/deep_gemm headers and other Pythons' builds are unused.
  rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so vllm/vllm-rs
  rm -rf vllm/third_party/deep_gemm/include vllm/third_party/fmha_sm100/cutlass vllm/third_party/fmha_sm100/cute \
         vllm/third_party/deep_gemm/_C.cpython-31{0,1,3,4}-x86_64-linux-gnu.so vllm/entrypoints/serve/instrumentator/static bin
  find . -name __pycache__ -prune -exec rm -rf {} + )
python3 -m pip install -q pyelftools >/dev/null 2>&1 || true
rm -rf stripped && mkdir -p stripped/vllm
python3 "$HERE/fatbin_strip.py" site/vllm/_C_stable_libtorch.abi3.so stripped/vllm/_C_stable_libtorch.abi3.so | tail -1
tar -C stripped -cf - vllm | xz -9 -T2 > "$OUT/p1s.tar.xz"
tar -C site --exclude=./vllm/_C_stable_libtorch.abi3.so -cf - . | xz -9 -T2 > "$OUT/p2s.tar.xz"
ls -la "$OUT"/p1s.tar.xz "$OUT"/p2s.tar.xz
