"""Rounding sensitivity of the int8 attention products: how far the model's output moves when the
float inputs of a product's quantizers move by one ulp, and which products stay int8 because of it.

Why: a static ``QuantizeLinear`` maps a float to ``round(x/s) + z``; a float that lies near a
rounding boundary flips its uint8 code when another CPU computes it one ulp differently (another
GEMM accumulation order, another exp). Weight layers absorb a flipped code (one of 384 terms);
attention's products do not always: ``softmax·V`` reads uint8 probabilities on the fixed grid
[0, 1] / 255, where a probability near a half step flips between 0 and 1/255 of a row's mass, and
``Q·Kᵀ`` feeds a softmax that exponentiates the flip. The ARM check of all-MiniLM-L6-v2 found the
int8 graph's output moving 1−cos 4e-4 between x86 and ARM (its quantization error: 1.4e-3).

What is measured, per int8 attention product ``p`` of the plan (the rest of the plan int8 too, the
model as it will be written):

    x'    = nextafter(x, ±inf)        for every float input x of p's QuantizeLinear nodes (both
                                       operands), each element one ulp up or down at random (seeded)
    drift = 1 − min over float outputs of mean over samples cos(y(x'), y(x))

on the first 16 evaluation feeds (held-out eval data when a tolerance is given, else the calibration
samples of the fidelity check): :class:`edgecomp.measure.evaluate.FidelityEvaluator` scores the perturbed
outputs against the unperturbed int8 model's, so ``drift`` is its loss. The perturbation enters
through extra graph inputs that replace the quantizers' inputs; nothing else changes.

Decision: a product stays int8 while ``drift <= share · budget``, ``budget`` the cosine loss the run
allows (the tolerance when its metric is cosine, else ``1 − min_cosine``: :func:`drift_budget`) and
``share`` :data:`DRIFT_SHARE`: one-ulp differences of another CPU may spend at most that share of
the budget per product. The products over it are kept float (a float product's one-ulp drift is
orders of magnitude smaller), and the report's table lists every product's drift, its share of the
budget and the decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from edgecomp.measure.evaluate import FidelityEvaluator
from edgecomp.quantize.plan import build
from edgecomp.quantize.quantize_static import LayerPlan
from edgecomp.runtime import make_session, run_feed

__all__ = ["DRIFT_SHARE", "AttentionDrift", "attention_drift", "drift_budget", "keep_stable_attention", "quantizer_inputs"]

#: the share of the loss budget one product's one-ulp drift may take
DRIFT_SHARE = 0.1

#: ops between a product and its quantizer: element moves, and the QDQ form's DequantizeLinear
_BETWEEN = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "DequantizeLinear")


class AttentionDrift:
    """Per product: the drift, and the rows of the report's table."""

    def __init__(self, drift: Mapping[str, float], budget: float, share: float = DRIFT_SHARE):
        self.drift, self.budget, self.share = dict(drift), float(budget), share

    @property
    def limit(self) -> float:
        return self.share * self.budget

    def unstable(self) -> list[str]:
        return [n for n, d in self.drift.items() if d > self.limit]

    def describe(self) -> str:
        """One line for the summary."""
        if not self.drift:
            return "no int8 attention product to measure"
        worst = max(self.drift, key=self.drift.get)
        return (f"{len(self.drift)} int8 attention product(s), largest one-ulp drift {self.drift[worst]:.2g} "
                f"(1-cos, {worst}); limit {self.limit:.2g} ({self.share:g} of the budget {self.budget:.2g}); "
                f"{len(self.unstable())} kept float for it")

    def rows(self) -> list[dict[str, Any]]:
        return [{"product": n, "1-ulp drift (1-cos)": d, "share of budget": d / self.budget if self.budget else None,
                 "decision": "float" if d > self.limit else "int8",
                 "reason": (f"one-ulp input changes move the output {d:.2g} > {self.limit:.2g} "
                            f"({self.share:g} of the budget {self.budget:.2g})" if d > self.limit else "stable")}
                for n, d in sorted(self.drift.items(), key=lambda kv: -kv[1])]


def quantizer_inputs(graph: ir.Graph, node_name: str) -> list[ir.Node]:
    """The QuantizeLinear nodes feeding the written form of the planned product ``node_name`` (its
    ``MatMulIntegerToFloat`` in the contrib form, its MatMul in the QDQ form), found by walking up
    each operand through element moves and DequantizeLinear."""
    product = next((n for n in graph if n.name in (f"{node_name}_int8", node_name)
                    and n.op_type in ("MatMulIntegerToFloat", "MatMul")), None)
    if product is None:
        return []
    found = []
    for v in product.inputs[:2]:
        while v is not None:
            p = v.producer()
            if p is None:
                break
            if p.op_type == "QuantizeLinear":
                found.append(p)
                break
            if p.op_type not in _BETWEEN:
                break
            v = p.inputs[0]
    return found


def attention_drift(built: ir.Model, products: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]],
                    threads: int = 1, seed: int = 0, ulps: int = 1) -> dict[str, float]:
    """The drift of each product in ``products`` (planned attention node names) of the quantized
    model ``built`` on ``feeds`` when its quantizers' inputs move by ``ulps`` ulps (see the module
    docstring; 0 moves nothing and measures 0)."""
    quantizers = {name: quantizer_inputs(built.graph, name) for name in products}
    quantizers = {k: v for k, v in quantizers.items() if v}
    if not quantizers:
        return {}
    watched = sorted({q.inputs[0].name for qs in quantizers.values() for q in qs})
    session = make_session(built, threads, extra_outputs=watched)
    n_out = len(built.graph.outputs)
    rng = np.random.default_rng(seed)
    moved: list[dict[str, np.ndarray]] = []
    dtypes: dict[str, np.dtype] = {}
    for feed in feeds:
        values = run_feed(session, feed)[n_out:]
        moved.append({_override(name): _ulps(x, rng, ulps) for name, x in zip(watched, values)})
        dtypes.update((name, np.asarray(x).dtype) for name, x in zip(watched, values))
    del session

    def run_moved(model: ir.Model, fs) -> list:
        s = make_session(model, threads)
        names = {i.name for i in s.get_inputs()}
        return [run_feed(s, {**f, **{k: v for k, v in m.items() if k in names}}) for f, m in zip(fs, moved)]

    evaluator = FidelityEvaluator(built, list(feeds), threads, runner=run_moved)
    return {name: float(evaluator.drop(_with_overrides(built, qs, dtypes))[1]) for name, qs in quantizers.items()}


def drift_budget(tolerance: float | None, metric: str, min_cosine: float | None) -> float | None:
    """The loss budget the drift (a 1 − cos) is held to: the tolerance when it bounds 1 − cosine,
    else ``1 − min_cosine`` (the fidelity floor); None when neither applies (nothing is checked)."""
    if tolerance is not None and metric == "cosine":
        return float(tolerance)
    return 1.0 - float(min_cosine) if min_cosine is not None else None


def keep_stable_attention(model: ir.Model, plan: Mapping[str, LayerPlan], feeds, budget: float, threads: int = 1,
                          format: str = "contrib", share: float = DRIFT_SHARE,
                          ) -> tuple[dict[str, LayerPlan], AttentionDrift | None]:
    """``plan`` without the attention products whose one-ulp drift exceeds ``share · budget``, and
    the measurement (None when the plan has no attention product)."""
    products = [n for n, p in plan.items() if p.kind == "attention"]
    if not products:
        return dict(plan), None
    result = AttentionDrift(attention_drift(build(model, plan, format=format), products, feeds, threads), budget, share)
    drop = set(result.unstable())
    return {n: p for n, p in plan.items() if n not in drop}, result


def _override(name: str) -> str:
    return f"{name}__one_ulp"


def _ulps(x: np.ndarray, rng: np.random.Generator, ulps: int) -> np.ndarray:
    """Each element moved ``ulps`` ulps toward +inf or -inf at random (its own dtype's ulp)."""
    x = np.asarray(x)
    toward = np.where(rng.random(x.shape) < 0.5, -np.inf, np.inf).astype(x.dtype)
    for _ in range(ulps):
        x = np.nextafter(x, toward).astype(x.dtype)
    return x


def _with_overrides(built: ir.Model, quantizers: Sequence[ir.Node], dtypes: Mapping[str, np.dtype]) -> ir.Model:
    """A copy of ``built`` whose listed QuantizeLinear nodes read new graph inputs (the dtype they
    were computed in, ``dtypes``; any shape) instead of their float inputs."""
    copy = built.clone()
    names = {q.name for q in quantizers}
    for node in copy.graph:
        if node.op_type == "QuantizeLinear" and node.name in names:
            x = node.inputs[0]
            fed = ir.Value(name=_override(x.name), type=ir.TensorType(ir.DataType.from_numpy(dtypes[x.name])))
            copy.graph.inputs.append(fed)
            node.replace_input_with(0, fed)
    return copy
