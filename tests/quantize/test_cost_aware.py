"""SmoothQuant paid for by time: when the family timing keeps everything float for a plan with
SmoothQuant, the layers are planned without it and timed again (the timing is stubbed here: it
says int8 is faster exactly when the plan has no SmoothQuant Mul, as measured on the zoo's tiny
encoders); a plan whose int8 is faster with SmoothQuant keeps it."""

import numpy as np
import onnx_ir as ir
import pytest

import edgecomp.quantize.step as quantize_step
import edgecomp.quantize.cost_aware as cost_aware
from edgecomp.data import Dataset
from edgecomp.quantize import quantize_model
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.targets import host_isa
from tests.conftest import write_token_files


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    rng = np.random.default_rng(3)
    return write_token_files(tmp_path_factory.mktemp("cost_aware"), 12, rng)


def _timing(smooth_faster: bool):
    def fake(model, layers, plan, feed, opts, confirm_feed=None):
        smoothed = any(p.smooth is not None for p in plan.values())
        chosen = {"matmul"} if (smoothed == smooth_faster) else set()
        return chosen, [{"families": "matmul", "decision": "chosen" if chosen else "-", "reason": "stub",
                         "latency ratio int8/float": 0.9 if chosen else 1.1, "95% interval": "[stub]", "rounds": 1}]
    return fake


@pytest.mark.parametrize("smooth_faster", [False, True], ids=["muls-cost-the-speedup", "smoothquant-pays"])
def test_smoothquant_dropped_only_when_it_costs_the_int8_speedup(monkeypatch, tiny_encoder_path, tokens, smooth_faster):
    monkeypatch.setattr(quantize_step, "choose_families", _timing(smooth_faster))
    monkeypatch.setattr(cost_aware, "choose_families", _timing(smooth_faster))
    opts = QuantizeOptions(isa=host_isa(), min_cosine=None)
    res = quantize_model(ir.load(str(tiny_encoder_path)), Dataset(tokens), opts)
    smoothed = [k for k, p in res.plan.items() if p.smooth is not None]
    assert res.plan, res.families  # int8 either way
    if smooth_faster:
        assert smoothed and not any(r.get("families") == "(SmoothQuant off)" for r in res.families)
    else:
        assert not smoothed
        note = next(r for r in res.families if r.get("families") == "(SmoothQuant off)")
        assert note["decision"] == "replanned"
        assert any(str(r.get("smoothquant α", "")).startswith("off:") for r in res.rows)
