#!/usr/bin/env bash
# End to end on the built-in digits MobileNetV2, offline: train (once) → `edgecomp convert` with
# the built-in cnn-int8 recipe (export → optimize → static int8 → validate → bench) → report.
# Outputs land in out/demo/; the HTML report is out/demo/convert/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=out/demo
mkdir -p "$OUT"

echo "== 1. train the reference classifier on sklearn's digits (skipped when weights exist)"
python -m models.digits --arch mobilenet_v2 --width 0.5 --write-data "$OUT"

echo; echo "== 2. convert: export → optimize → quantize → validate → bench, with gates"
edgecomp convert models.mobilenet_v2:digits_classifier --recipe cnn-int8 -o "$OUT/convert" --overwrite \
    --data "$OUT/train.npz" --eval "$OUT/test.npz" --labels "$OUT/test_labels.npy"

echo; echo "== 3. what the final model holds"
edgecomp inspect "$OUT/convert/model.onnx"
echo; echo "report: $OUT/convert/report.html"
