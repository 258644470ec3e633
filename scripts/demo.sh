#!/usr/bin/env bash
# End to end on the built-in digits MobileNetV2: train (once) → export → optimize →
# inspect → validate → bench. Works offline; outputs land in out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=out/demo
mkdir -p "$OUT"

echo "== 1. train the reference classifier on sklearn's digits (skipped when weights exist)"
python -m models.digits --arch mobilenet_v2 --width 0.5 --write-data "$OUT"

echo; echo "== 2. export to ONNX (parity-checked against torch)"
edgecomp export models.mobilenet_v2:digits_classifier -o "$OUT/digits.onnx" --dynamic x:0=batch

echo; echo "== 3. optimize the graph"
edgecomp optimize "$OUT/digits.onnx" -o "$OUT/digits.opt.onnx"

echo; echo "== 4. inspect"
edgecomp inspect "$OUT/digits.opt.onnx" --shape x=1x1x32x32

echo; echo "== 5. validate against the fp32 export on the held-out digits"
edgecomp validate "$OUT/digits.onnx" "$OUT/digits.opt.onnx" --data "$OUT/test.npz" --labels "$OUT/test_labels.npy"

echo; echo "== 6. latency vs the fp32 ONNX baseline (interleaved, 1 thread)"
edgecomp bench "$OUT/digits.onnx" "$OUT/digits.opt.onnx" --threads 1 --runs 200
