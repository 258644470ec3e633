"""int4 MatMul weights chosen per layer: fit the 4-bit codes to calibration data, rank the int8
layers by how much int4 would cost them, and convert the cheapest while the fidelity bound holds.

The codes. Each output column of ``W`` [K, N] is cut along K into blocks of ``B`` values, each
with an asymmetric 4-bit grid ``w ≈ (q - zp) · scale`` (:mod:`edgecomp.quantize.quantize_matmul_nbits`
stores it for onnxruntime's ``MatMulNBits``). Three ways of choosing them, all measured on the
calibration Gram matrix ``H = Σ xᵀx`` of the layer's input, by the relative output error::

    err(Ŵ) = tr((W - Ŵ)ᵀ H (W - Ŵ)) / tr(Wᵀ H W)        (= ‖X(W - Ŵ)‖² / ‖XW‖² on those rows)

- ``rtn``: round to nearest on the block's [min, max] (0 always on the grid), as onnxruntime's
  own blockwise quantizer does;
- ``clip``: the block's range shrunk by the ratio ``r`` (of :data:`CLIP_RATIOS`) with the least
  ``Σ_k H_kk (w_k - ŵ_k)²`` (rounding error traded against clipping, weighted by how large
  each input channel is);
- ``gptq``: GPTQ (Frantar et al. 2022) — rows of ``W`` quantized in order, each row's error
  ``e = (w_k - ŵ_k) / U_kk`` fed back to the rows not yet quantized, ``W[k+1:] -= U[k, k+1:]ᵀ e``,
  with ``U`` the upper Cholesky factor of ``(H + λI)⁻¹`` (λ = 1% of mean(diag H)); each block's
  grid is chosen (as in ``clip``) from the weights as updated when the block is reached.

Layouts (``int4_block``, ``int4_grid``): a block of ``B`` rows per scale, and an asymmetric grid (a
zero point per block) or a symmetric one (``zp = 8``: ``w ≈ (q - 8) · scale``, ``scale = max(-lo / 8, hi / 7)``,
no zero points stored). At rest (float16 scales) a ``[K, N]`` weight costs ``K·N/2 + (K/B)·N·(2 + 1)``
bytes (``+ 0`` symmetric): 4.75 bits a weight at B = 32 asymmetric, 4.125 at B = 128 symmetric. With
``auto`` each layer fits every allowed layout and takes the fewest bytes among those whose held-out
output error is within ``int4_error_ratio`` of the least any layout reaches (:func:`fit_layout`).

The calibration samples are split in two: the even ones give the ``H`` the codes are fitted to,
the odd ones the ``H`` they are scored on (GPTQ would look better than it is on its own data);
each layer keeps the method of least held-out error.

The choice (``int4 = auto``): the layers of the int8 plan whose weight is a MatMul's, ordered by
that held-out error (the cheapest first); the most that still meet the bound (the fidelity
floor on the odd calibration samples, or the tolerance on eval data) are found by bisection on their
count, each candidate built whole as it will be written (int8 rest, int4 part at rest with int8 compute
or in ``MatMulNBits``: :func:`written_form`) and run in onnxruntime, then the next
cheapest are tried one at a time (:data:`GREEDY_TRIES`). ``int4 = REGEX,...`` converts the
planned MatMuls whose names match, and only measures the result.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset, input_specs
from edgecomp.errors import OptionError, PassFailed
from edgecomp.passes.base import run_pass
from edgecomp.quantize.int4_at_rest import apply_int4_at_rest, int4_weights
from edgecomp.quantize.plan import build
from edgecomp.quantize.quantize_matmul_nbits import QuantizeMatMulNBitsPass
from edgecomp.quantize.quantize_static import LayerPlan
from edgecomp.runtime import make_session

__all__ = [
    "METHODS",
    "Int4Choice",
    "Int4Codes",
    "Int4Layout",
    "apply_int4",
    "at_rest_bytes",
    "choose_int4",
    "clip_codes",
    "describe",
    "fit_codes",
    "fit_layout",
    "gptq_codes",
    "gptq_factor",
    "gram_matrices",
    "int4_compute",
    "int4_step",
    "latency_vs_int8",
    "output_error",
    "rtn_codes",
    "write_int4",
    "written_form",
]

METHODS = ("rtn", "clip", "gptq")
CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.5, 11), 3))
GREEDY_TRIES = 6
AUTO_BLOCKS = (32, 64, 128)  # int4_block auto: the block sizes a layer may take
DAMP = 0.01


@dataclasses.dataclass
class Int4Codes:
    """4-bit codes of a ``[K, N]`` weight: ``q`` uint8 [K, N] in 0..15, ``scale`` float32 and
    ``zp`` uint8 [blocks, N]; ``w ≈ (q - zp[k // block]) · scale[k // block]``."""

    q: np.ndarray
    scale: np.ndarray
    zp: np.ndarray
    block: int
    method: str = "rtn"
    symmetric: bool = False  # zp is 8 everywhere: the written form stores no zero points

    def dequantize(self) -> np.ndarray:
        rows = np.arange(self.q.shape[0]) // self.block
        return ((self.q.astype(np.float32) - self.zp[rows]) * self.scale[rows]).astype(np.float32)

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B [N, blocks, block/2], scales [N·blocks], zero points) as ``MatMulNBits`` stores them;
        K is padded to whole blocks with the zero point's code (the value 0)."""
        k, n = self.q.shape
        blocks = self.scale.shape[0]
        q = np.repeat(self.zp, self.block, axis=0)  # padding rows hold the code of 0
        q[:k] = self.q
        qb = q.T.reshape(n, blocks, self.block)
        b = (qb[..., 0::2] | (qb[..., 1::2] << 4)).astype(np.uint8)
        zp = self.zp.T
        if blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        zps = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
        return b, np.ascontiguousarray(self.scale.T).reshape(-1).astype(np.float32), zps


def _grid(lo: np.ndarray, hi: np.ndarray, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if symmetric:  # codes 0..15 around 8: w in [-8 scale, 7 scale]
        scale = np.maximum(-lo / 8.0, hi / 7.0)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return scale, np.full(scale.shape, 8, np.uint8)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
    return scale, zp


def _codes(w: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return np.clip(np.round(w / scale) + zp, 0, 15).astype(np.uint8)


def _blocked(w: np.ndarray, block: int) -> np.ndarray:
    """``w`` [K, N] as [blocks, block, N], K padded with zeros."""
    k, n = w.shape
    blocks = -(-k // block)
    out = np.zeros((blocks * block, n), np.float32)
    out[:k] = w
    return out.reshape(blocks, block, n)


def _best_grid(wb: np.ndarray, weight: np.ndarray, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per (block, column) of ``wb`` [blocks, block, N]: the grid of the clip ratio with the least
    ``weight``-weighted squared error (``weight`` [blocks, block, 1])."""
    lo, hi = wb.min(1), wb.max(1)
    best = None
    for r in CLIP_RATIOS:
        scale, zp = _grid(r * lo, r * hi, symmetric)
        deq = (_codes(wb, scale[:, None], zp[:, None]).astype(np.float32) - zp[:, None]) * scale[:, None]
        err = (weight * (wb - deq) ** 2).sum(1)
        if best is None:
            best = (err, scale, zp)
            continue
        better = err < best[0]
        best = (np.where(better, err, best[0]), np.where(better, scale, best[1]), np.where(better, zp, best[2]))
    return best[1], best[2]


def rtn_codes(w: np.ndarray, block: int, symmetric: bool = False) -> Int4Codes:
    """Round to nearest on each block's [min, max] (with 0): onnxruntime's blockwise quantizer."""
    wb = _blocked(w, block)
    scale, zp = _grid(wb.min(1), wb.max(1), symmetric)
    q = _codes(wb, scale[:, None], zp[:, None]).reshape(-1, w.shape[1])[: w.shape[0]]
    return Int4Codes(q, scale, zp, block, "rtn", symmetric)


def _row_weight(h: np.ndarray | None, k: int, block: int) -> np.ndarray:
    d = np.ones(k) if h is None else np.maximum(np.diag(h), 0.0)
    out = np.zeros(-(-k // block) * block)
    out[:k] = d
    return out.reshape(-1, block, 1)


def clip_codes(w: np.ndarray, block: int, h: np.ndarray | None = None, symmetric: bool = False) -> Int4Codes:
    """Each block's range shrunk by the clip ratio of least ``diag(H)``-weighted squared error."""
    wb = _blocked(w, block)
    scale, zp = _best_grid(wb, _row_weight(h, w.shape[0], block), symmetric)
    q = _codes(wb, scale[:, None], zp[:, None]).reshape(-1, w.shape[1])[: w.shape[0]]
    return Int4Codes(q, scale, zp, block, "clip", symmetric)


def gptq_factor(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, diag of the damped H, dead inputs) for :func:`gptq_codes`: the same for every layout of a layer."""
    H = np.array(h, np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices(H.shape[0])] += DAMP * float(np.mean(np.diag(H)))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # (H + λI)⁻¹ = Uᵀ U, U upper triangular
    return U, np.diag(H), dead


def gptq_codes(w: np.ndarray, block: int, h: np.ndarray, symmetric: bool = False,
               factor: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Int4Codes:
    """GPTQ with one grid per block, chosen when the block is reached (module docstring); ``factor``:
    :func:`gptq_factor` of ``h`` when it is already computed."""
    k, n = w.shape
    U, diag_h, dead = factor or gptq_factor(h)
    W = w.astype(np.float64).copy()
    W[dead] = 0.0
    blocks = -(-k // block)
    q = np.zeros((k, n), np.uint8)
    scales, zps = np.zeros((blocks, n), np.float32), np.zeros((blocks, n), np.uint8)
    for g in range(blocks):
        i0, i1 = g * block, min(k, (g + 1) * block)
        wb = _blocked(W[i0:i1].astype(np.float32), block)
        weight = np.zeros((1, block, 1))
        weight[0, : i1 - i0, 0] = diag_h[i0:i1]
        scale, zp = (a[0] for a in _best_grid(wb, weight, symmetric))
        scales[g], zps[g] = scale, zp
        err = np.zeros((i1 - i0, n))
        for i in range(i0, i1):
            qi = _codes(W[i], scale, zp)
            q[i] = qi
            e = (W[i] - (qi.astype(np.float64) - zp) * scale) / U[i, i]
            W[i + 1:i1] -= np.outer(U[i, i + 1:i1], e)
            err[i - i0] = e
        W[i1:] -= U[i0:i1, i1:].T @ err
    return Int4Codes(q, scales, zps, block, "gptq", symmetric)


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``tr(ΔᵀHΔ) / tr(WᵀHW)``: the relative squared output error on the rows ``H`` sums."""
    d = (w - w_hat).astype(np.float64)
    w = w.astype(np.float64)
    return float(((h @ d) * d).sum()) / max(float(((h @ w) * w).sum()), 1e-30)


def gram_matrices(model: ir.Model, acts: Sequence[str], data: Dataset, limit: int | None = None,
                  threads: int = 1) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """(``{act: (H_fit, H_check)}``, samples): ``Σ xᵀx`` over the rows of each activation, even
    samples in ``H_fit`` and odd ones in ``H_check`` (with one sample, both are the same)."""
    acts = list(dict.fromkeys(acts))
    session = make_session(model, threads=threads, optimization="basic", extra_outputs=acts)
    names = [o.name for o in session.get_outputs()]
    idx = [names.index(a) for a in acts]
    sums: dict[str, list[np.ndarray]] = {}
    count = 0
    for count, feed in enumerate(data.feeds_for(input_specs(model), limit), start=1):
        outs = session.run(None, dict(feed))
        for a, i in zip(acts, idx):
            x = np.asarray(outs[i], np.float64)
            x = x.reshape(-1, x.shape[-1])
            pair = sums.setdefault(a, [np.zeros((x.shape[1],) * 2), np.zeros((x.shape[1],) * 2)])
            pair[(count - 1) % 2] += x.T @ x
    if count == 0:
        raise PassFailed("int4 needs calibration samples; the calibration data holds none")
    return {a: (f, c if count > 1 else f) for a, (f, c) in sums.items()}, count


def fit_codes(w: np.ndarray, block: int, h_fit: np.ndarray, h_check: np.ndarray, symmetric: bool = False,
              factor: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[Int4Codes, dict[str, float]]:
    """The codes of least held-out output error among :data:`METHODS`, and each method's error."""
    cands = {"rtn": rtn_codes(w, block, symmetric), "clip": clip_codes(w, block, h_fit, symmetric),
             "gptq": gptq_codes(w, block, h_fit, symmetric, factor)}
    errs = {m: output_error(w, c.dequantize(), h_check) for m, c in cands.items()}
    best = min(errs, key=errs.get)
    return cands[best], errs


def at_rest_bytes(k: int, n: int, block: int, symmetric: bool) -> int:
    """Bytes of one ``[K, N]`` weight at rest (:mod:`edgecomp.quantize.int4_at_rest`): the codes two per
    byte, a float16 scale per block and column, and (asymmetric) a uint8 zero point per block and column."""
    blocks = -(-k // block)
    return blocks * block * n // 2 + blocks * n * (2 if symmetric else 3)


def fit_layout(w: np.ndarray, h_fit: np.ndarray, h_check: np.ndarray, blocks: Sequence[int],
               grids: Sequence[bool], ratio: float) -> tuple[Int4Codes, dict[str, float], list[dict[str, Any]]]:
    """The layout (block size, symmetric grid) of one weight: of those whose held-out output error is
    within ``ratio`` of the least error any layout reaches, the fewest bytes at rest (then the least
    error). Returns the codes, their methods' errors, and a row per layout tried."""
    k, n = w.shape
    tried = []
    factor = gptq_factor(h_fit)
    for block in blocks:
        if k < block:
            continue
        for sym in grids:
            codes, errs = fit_codes(w, block, h_fit, h_check, sym, factor)
            tried.append((codes, errs, {"block": block, "symmetric": sym, "error": errs[codes.method],
                                        "bytes": at_rest_bytes(k, n, block, sym)}))
    best_err = min(t[2]["error"] for t in tried)
    fits = [t for t in tried if t[2]["error"] <= ratio * best_err]
    codes, errs, _ = min(fits, key=lambda t: (t[2]["bytes"], t[2]["error"]))
    return codes, errs, [t[2] for t in tried]


@dataclasses.dataclass
class Int4Choice:
    """Which planned layers become int4 (``codes``, by node name), with a row per candidate and
    the measured loss of the model as chosen (``loss``: 1 - lowest output cosine, or the eval
    metric's loss)."""

    codes: dict[str, Int4Codes]
    rows: dict[str, dict[str, Any]]
    loss: float | None
    bound: float | None
    met: bool | None
    block: int
    trials: int = 0
    bound_text: str = ""
    is_cosine: bool = True
    note: str = ""  # why there was no candidate
    layout: Int4Layout | None = None


def _candidates(model: ir.Model, plan: Mapping[str, LayerPlan], block: int) -> dict[str, ir.Node]:
    nodes = {n.name: n for n in model.graph}
    out = {}
    for name, lp in plan.items():
        node = nodes.get(name)
        if lp.kind != "matmul" or node is None or node.op_type != "MatMul":
            continue
        w = node.inputs[1].const_value
        if w is not None and len(w.shape) == 2 and w.shape[0] >= block:
            out[name] = node
    return out


def apply_int4(model: ir.Model, codes: Mapping[str, Int4Codes]) -> ir.Model:
    """A copy of ``model`` (float or int8 elsewhere) with the MatMuls named in ``codes`` in int4
    ``MatMulNBits`` (each layer at its codes' block size)."""
    out = model.clone()
    for size in sorted({c.block for c in codes.values()}):
        group = {name: c.packed() for name, c in codes.items() if c.block == size}
        out = run_pass(QuantizeMatMulNBitsPass(block_size=size, accuracy_level=4, only=list(group), codes=group),
                       out).model
    return out


def int4_compute(opts: Any) -> str:
    """``int8`` or ``nbits`` for ``opts.int4_compute`` (auto: int8 on x86 targets, nbits elsewhere)."""
    if opts.int4_compute != "auto":
        return opts.int4_compute
    from edgecomp.targets import host_isa

    return "int8" if (opts.isa or host_isa()).arch == "x86_64" else "nbits"


def written_form(model: ir.Model, plan: Mapping[str, LayerPlan], codes: Mapping[str, Int4Codes], compute: str, *,
                 embeddings: bool = False, format: str | None = "contrib") -> ir.Model:
    """The model as written with the layers of ``codes`` in int4 and the rest of ``plan`` int8:
    ``compute`` nbits: those layers in ``MatMulNBits``; int8: the int8 model of ``plan`` built on
    the int4 weights, those layers' int8 weights stored at rest in int4
    (:mod:`edgecomp.quantize.int4_at_rest`). The per-layer choice measures exactly this model."""
    if compute == "nbits":
        return apply_int4(build(model, {n: p for n, p in plan.items() if n not in codes}, embeddings, format), codes)
    return apply_int4_at_rest(build(int4_weights(model, codes), plan, embeddings, format), codes, plan)


def write_int4(model: ir.Model, int8_plan: Mapping[str, Any], codes: Mapping[str, Int4Codes], opts: Any
               ) -> tuple[ir.Model, str]:
    """The written model for the chosen int4 layers and how it runs (:func:`written_form`)."""
    compute = int4_compute(opts)
    form = "MatMulNBits" if compute == "nbits" else "int4 at rest, int8 compute (folded at session load)"
    return written_form(model, int8_plan, codes, compute, format=opts.format), form


@dataclasses.dataclass(frozen=True)
class Int4Layout:
    """The layouts a layer's int4 weight may take (:func:`fit_layout`): block sizes along K, grids
    (False: asymmetric with zero points, True: symmetric), and the error ratio a smaller layout may
    cost over the layer's least-error one. One block and one grid: every layer the same."""

    blocks: tuple[int, ...] = (32,)
    grids: tuple[bool, ...] = (False,)
    ratio: float = 1.0

    @classmethod
    def of(cls, opts: Any) -> Int4Layout:
        """From ``int4_block`` (a size, or auto: 32, 64 and 128), ``int4_grid`` and ``int4_error_ratio``."""
        blocks = AUTO_BLOCKS if opts.int4_block == "auto" else (int(opts.int4_block),)
        grids = {"asymmetric": (False,), "symmetric": (True,), "auto": (False, True)}[opts.int4_grid]
        return cls(blocks, grids, float(opts.int4_error_ratio))

    def describe(self) -> str:
        grid = {(False,): "asymmetric", (True,): "symmetric"}.get(self.grids, "asymmetric or symmetric")
        if len(self.blocks) == 1 and len(self.grids) == 1:
            return f"block {self.blocks[0]}, {grid}"
        return (f"block {'/'.join(map(str, self.blocks))}, {grid} per layer: the fewest bytes within "
                f"{self.ratio:g}x the layer's least output error")


def choose_int4(model: ir.Model, plan: Mapping[str, LayerPlan], calibration: Dataset, selection: str,
                layout: Int4Layout | int, *, compute: str = "nbits", evaluator=None, bound: float | None = None,
                embeddings: bool = False, limit: int | None = None, threads: int = 1) -> Int4Choice:
    """The int4 layers of ``plan`` (``selection``: ``auto`` or comma regexes; module docstring), each
    in its layout (``layout``: an :class:`Int4Layout`, or one block size).

    ``evaluator.drop(model)[1]`` is the loss a candidate model is held to (``bound``); ``auto``
    needs both. Every candidate is the model as it would be written (:func:`written_form` with
    ``compute``): the int8 ``plan`` built whole with its int4 part in that form."""
    if isinstance(layout, int):
        layout = Int4Layout((layout,))
    block = min(layout.blocks)
    cands = _candidates(model, plan, block)
    if selection != "auto":
        pats = [re.compile(p) for p in selection.split(",") if p]
        cands = {n: node for n, node in cands.items() if any(p.search(n) for p in pats)}
    if not cands:
        what = "matches the int4 patterns" if selection != "auto" else f"has constant 2-D weights with K >= {block}"
        return Int4Choice({}, {}, None, bound, None, block, note=f"no MatMul of the int8 plan {what}")
    weights = {n: node.inputs[1].const_value.numpy().astype(np.float32) for n, node in cands.items()}
    grams, _ = gram_matrices(model, [node.inputs[0].name for node in cands.values()], calibration, limit, threads)
    codes, rows = {}, {}
    for name, node in cands.items():
        h_fit, h_check = grams[node.inputs[0].name]
        codes[name], errs, tried = fit_layout(weights[name], h_fit, h_check, layout.blocks, layout.grids, layout.ratio)
        rows[name] = {"int4 error": errs[codes[name].method], "int4 method": codes[name].method,
                      "int4 error rtn": errs["rtn"], "int4 block": codes[name].block,
                      "int4 grid": "symmetric" if codes[name].symmetric else "asymmetric",
                      "int4 layouts": tried}

    def candidate(names: Sequence[str]) -> ir.Model:
        return written_form(model, plan, {n: codes[n] for n in names}, compute, embeddings=embeddings)

    trials = 0

    def loss_of(names: Sequence[str]) -> float:
        nonlocal trials
        trials += 1
        return evaluator.drop(candidate(names))[1]

    if selection != "auto":
        loss = loss_of(list(codes)) if evaluator is not None else None
        met = None if loss is None or bound is None else loss <= bound
        return Int4Choice(codes, rows, loss, bound, met, block, trials, layout=layout)
    order = sorted(codes, key=lambda n: rows[n]["int4 error"])
    losses = {len(order): loss_of(order)}
    if losses[len(order)] > bound:
        lo, hi = 0, len(order)  # lo: known to hold (the int8 plan itself), hi: known to fail
        losses[0] = None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            losses[mid] = loss_of(order[:mid])
            lo, hi = (mid, hi) if losses[mid] <= bound else (lo, mid)
        chosen = order[:lo]
        loss = losses[lo]
        for name in order[lo + 1:][:GREEDY_TRIES]:  # order[lo] failed in the bisection
            trial = loss_of([*chosen, name])
            if trial <= bound:
                chosen, loss = [*chosen, name], trial
    else:
        chosen, loss = order, losses[len(order)]
    if not chosen:
        loss = None
    return Int4Choice({n: codes[n] for n in chosen}, rows, loss, bound, loss is None or loss <= bound, block, trials,
                      layout=layout)


def int4_step(model: ir.Model, plan: Mapping[str, LayerPlan], calibration: Dataset, opts, *,
              eval_data: Dataset | None = None, labels: np.ndarray | None = None,
              reference: ir.Model | None = None) -> Int4Choice | None:
    """What :func:`edgecomp.quantize.quantize_model` calls after the int8 plan is final: the int4
    layers by ``opts.int4``, held to the bound the int8 plan was held to — ``tolerance`` on eval
    data when given, else every output's cosine ``>= min_cosine`` on up to ``fidelity_samples``
    calibration samples the codes were not fitted to (the odd ones). ``reference``: the model the
    bound is measured against (the model as given to quantize, before its cleanup), else ``model``."""
    from edgecomp.measure.evaluate import Evaluator, FidelityEvaluator

    if opts.int4 == "off":
        return None
    if not plan:
        return Int4Choice({}, {}, None, None, None, min(Int4Layout.of(opts).blocks),
                          note="no layer is int8 to start from (int4 replaces int8 MatMuls)")
    specs = input_specs(model)
    evaluator, bound = None, None
    if opts.tolerance is not None:
        evaluator = Evaluator(reference or model, eval_data.reread(specs), opts.metric, labels, opts.threads)
        bound = float(opts.tolerance)
    elif opts.min_cosine is not None:
        # the odd samples: the codes were fitted to the even ones (a check on them flatters GPTQ)
        feeds = list(calibration.feeds_for(specs, 2 * opts.fidelity_samples))
        evaluator = FidelityEvaluator(reference or model, feeds[1::2] or feeds, opts.threads)
        bound = 1.0 - float(opts.min_cosine)
    elif opts.int4 == "auto":
        raise OptionError("int4", "auto needs a bound to hold: a tolerance with eval data, or min_cosine")
    choice = choose_int4(model, plan, calibration, opts.int4, Int4Layout.of(opts), compute=int4_compute(opts),
                         evaluator=evaluator, bound=bound, embeddings=opts.embeddings, limit=opts.max_samples,
                         threads=opts.threads)
    choice.bound_text = (f"{opts.metric} loss <= {opts.tolerance:g} on eval data" if opts.tolerance is not None
                         else f"every output's cosine >= {opts.min_cosine:g} on {len(evaluator.feeds)} held-out "
                              "calibration samples")
    choice.is_cosine = opts.tolerance is None
    return choice


def describe(choice: Int4Choice, rows: list[dict[str, Any]], layers_int8: int) -> dict[str, Any]:
    """Mark the int4 layers (and the candidates left int8) in the per-layer ``rows``; the
    summary entries of the choice."""
    for row in rows:
        info = choice.rows.get(row["layer"])
        if info is None:
            continue
        row["int4 error"] = info["int4 error"]
        if row["layer"] in choice.codes:
            row["decision"] = "int4"
            row["reason"] = (f"int4 ({info['int4 method']}, block {info['int4 block']}, {info['int4 grid']}): "
                             f"output error {info['int4 error']:.2e} "
                             f"on held-out calibration rows (round-to-nearest {info['int4 error rtn']:.2e})")
        elif row.get("decision") == "int8":
            row["reason"] = f"quantized; int4 left out: {choice.bound_text} would not hold"
    selected = sorted(choice.codes)
    if not choice.rows:
        return {"int4": f"none: {choice.note}"}
    layout = choice.layout.describe() if choice.layout else f"block {choice.block}"
    text = f"{len(selected)} of {len(choice.rows)} int8 MatMuls in int4 ({layout}), {layers_int8} still int8"
    if choice.loss is not None:
        measured = (f"lowest output cosine {1.0 - choice.loss:.4f}" if choice.is_cosine else f"loss {choice.loss:.4g}")
        text += f"; {measured} ({choice.bound_text}{'' if choice.met in (None, True) else ': not met'})"
    methods = [choice.codes[n].method for n in selected]
    out = {"int4": text, "int4 layers": ", ".join(selected) or "none"}
    if methods:
        out["int4 codes"] = ", ".join(f"{m} {methods.count(m)}" for m in METHODS if m in methods) + \
            " (least output error on held-out calibration rows)"
        kinds = [f"block {choice.codes[n].block} {'symmetric' if choice.codes[n].symmetric else 'asymmetric'}"
                 for n in selected]
        out["int4 layouts"] = ", ".join(f"{k} x{kinds.count(k)}" for k in sorted(set(kinds)))
        ratios = _layout_error_ratios(choice.rows.values())
        if len(ratios) > 1:
            out["int4 layout error"] = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + \
                " the layer's least output error (median over layers)"
    return out


def _layout_error_ratios(rows) -> dict[str, float]:
    """Per layout tried: the median over layers of its error over the layer's least (what int4_error_ratio
    is compared with)."""
    ratios: dict[str, list[float]] = {}
    for row in rows:
        tried = row.get("int4 layouts") or []
        best = min((t["error"] for t in tried), default=0.0)
        for t in tried:
            key = f"block {t['block']} {'symmetric' if t['symmetric'] else 'asymmetric'}"
            ratios.setdefault(key, []).append(t["error"] / best if best > 0 else 1.0)
    return {k: float(np.median(v)) for k, v in ratios.items()}


def latency_vs_int8(model: ir.Model, plan: Mapping[str, LayerPlan], written: ir.Model, feed, opts):
    """The written model's latency over the int8-only model's (the same plan, no int4), interleaved
    (:func:`edgecomp.measure.bench.compare_latency`), with its 95% interval."""
    from edgecomp.measure.bench import compare_latency

    int8 = build(model, plan, opts.embeddings, opts.format)
    return compare_latency([int8, written], feed, threads=opts.threads, runs_per_round=10, max_rounds=6,
                           labels=["int8", "int4"])[0]
