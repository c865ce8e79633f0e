#!/bin/bash
# Packs what an NVIDIA GPU machine without network needs to run apollo-train's GPU tests and benchmarks:
# vLLM 0.26.0 (the newest release built for torch 2.11 + CUDA 13) and the dependencies of its OpenAI
# server that such an image lacks, plus apollo-torch (the reference optimizer for benchmarks/optim_bench.py).
#
#   scripts/gpu_bundle.sh [OUT_DIR]      (default .devcarry; needs PyPI here, takes a few minutes)
#
# Writes OUT_DIR/p1s.tar.xz and OUT_DIR/p2s.tar.xz (about 60 MiB together, see scripts/gpu/pack.sh),
# OUT_DIR/device_env.sh (source it on the GPU machine) and OUT_DIR/pylib/apollo_torch. Existing parts are
# kept; set FORCE=1 to rebuild them. Other files in OUT_DIR are left alone. Then, on the GPU machine:
#   scripts/gpu_run.sh RESULTS_DIR        (see docs/gpu.md)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-$REPO/.devcarry}" && cd "${1:-$REPO/.devcarry}" && pwd)
if [ "${FORCE:-0}" = 1 ] || [ ! -s "$OUT/p1s.tar.xz" ] || [ ! -s "$OUT/p2s.tar.xz" ]; then
  bash "$REPO/scripts/gpu/pack.sh" "$OUT"
fi
cp "$REPO/scripts/gpu/device_env.sh" "$OUT/device_env.sh"

# apollo-torch 1.0.3 is pure Python: carry the package directory itself.
PY=${PYTHON:-python3}
[ -x "$REPO/.venv/bin/python" ] && PY="$REPO/.venv/bin/python"
SRC=$("$PY" - <<'EOF' 2>/dev/null || true
import importlib.util
spec = importlib.util.find_spec("apollo_torch")
print(spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else "")
EOF
)
if [ -z "$SRC" ]; then
  TMP=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$TMP" apollo-torch==1.0.3
  (cd "$TMP" && python3 -m zipfile -e apollo_torch-*.whl unpacked)
  SRC="$TMP/unpacked/apollo_torch"
fi
rm -rf "$OUT/pylib/apollo_torch" && mkdir -p "$OUT/pylib"
cp -r "$SRC" "$OUT/pylib/apollo_torch" && rm -rf "$OUT/pylib/apollo_torch/__pycache__"
du -sh "$OUT"
echo "copy $(basename "$OUT") to the GPU machine along with the working tree"
