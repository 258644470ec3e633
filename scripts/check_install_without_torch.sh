#!/usr/bin/env bash
# A fresh venv without torch (#21 item 6): `pip install` of this checkout alone (its required
# dependencies, none of the extras), then optimize, quantize, validate, bench and inspect on a small
# ONNX model, and export refusing in one line that names the torch extra.
#
#   scripts/check_install_without_torch.sh [PYTHON]     (default python3; >= 3.11)
#
# Needs a package index (PyPI or a local mirror) for the dependencies; prints "OK" at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"  # a plain venv: no system site-packages, whatever torch the system has
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check .
if "$work/venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    echo "torch was installed with edgecomp: it must be an extra" >&2
    exit 1
fi
cd "$work"
"$work/venv/bin/python" - <<'PY'
import numpy as np
from onnx import TensorProto, helper, save

rng = np.random.default_rng(0)
w1, b1 = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
w2, b2 = rng.standard_normal((16, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in
         (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))]
nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
         helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y0"]),
         helper.make_node("Add", ["y0", "b2"], ["y"])]
graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "mlp.onnx")
np.savez("x.npz", x=rng.standard_normal((32, 8)).astype(np.float32))
PY
ec="$work/venv/bin/edgecomp"
"$ec" optimize mlp.onnx -o opt.onnx
"$ec" quantize mlp.onnx -o q.onnx --data x.npz
"$ec" validate mlp.onnx q.onnx --data x.npz
"$ec" bench mlp.onnx q.onnx --runs 20
"$ec" inspect q.onnx > /dev/null
printf 'import torch\ndef make():\n    return torch.nn.Linear(4, 3), (torch.randn(1, 4),)\n' > net.py
set +e
"$ec" export net.py:make -o net.onnx 2> refusal.txt
status=$?
set -e
if [ "$status" != 1 ] || [ "$(wc -l < refusal.txt)" != 1 ] || ! grep -q "pip install 'edgecomp\[torch\]'" refusal.txt; then
    echo "export without torch: exit $status, stderr:" >&2
    cat refusal.txt >&2
    exit 1
fi
echo "export without torch refused (exit 1): $(cat refusal.txt)"
echo OK
