#!/usr/bin/env python
"""Prune without data: does the check on synthesized inputs agree with the check on real data?
→ BENCHMARKS.md (section "prune-nodata").

    .venv/bin/python scripts/bench_prune_nodata.py [--workdir out/bench_prune_nodata] [--models a,b,...]

For each development-zoo model (tests/zoo.py: its file and its real DATA), structured and
unstructured pruning at sparsity 0.3 and 0.5 without data, exactly as ``edgecomp prune`` runs it
(:func:`edgecomp.prune.run`, ``allow_degraded`` so every result can be measured). The synthetic
verdict is the one prune itself reaches (mean cosine and top-1 agreement against the unpruned
model on 16 synthesized inputs, floor 0.95); the real verdict applies the same floor to the same
pruned model on the model's DATA (every sample, :func:`edgecomp.measure.validate.validate`).
"agree" says whether both verdicts are the same; "missed" marks a model the synthetic check
passes but real data fails (the dangerous case), "false alarm" the opposite (a model that does not
run on synthesized inputs, "not checked", is refused like one below the floor).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from _bench_common import ROOT, md_table, update_section

sys.path.insert(0, str(ROOT))
from tests.zoo import Zoo  # noqa: E402

from edgecomp.data import StepData  # noqa: E402
from edgecomp.errors import EdgecompError  # noqa: E402
from edgecomp.io import load_model  # noqa: E402
from edgecomp.measure.validate import validate  # noqa: E402
from edgecomp.prune import run  # noqa: E402
from edgecomp.prune.fidelity import below_floor  # noqa: E402
from edgecomp.prune.options import FIDELITY_FLOOR, SYNTHETIC_SAMPLES, PruneOptions  # noqa: E402
from edgecomp.render.text import host_line  # noqa: E402

MODELS = ["resnet-ts17", "mnv2-ts17", "digits", "encoder-ts17", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet",
          "silero_vad", "silero_vad_ifless"]


def real_fidelity(original, pruned, data: Path) -> dict:
    res = validate(original, pruned, str(data))
    outs = res.outputs
    top1 = [o.top1_agreement for o in outs if o.top1_agreement is not None]
    return {"samples": res.samples, "inputs": "all", "cosine": min((o.cosine_mean for o in outs), default=None),
            "top-1 agreement": min(top1) if top1 else None}


def verdict(fid: dict) -> str:
    if fid.get("not checked"):
        return "not checked"
    return "below" if below_floor(fid) else "ok"


def one(name: str, path: Path, data: Path, structured: bool, sparsity: float) -> dict:
    row = {"model": name, "pruning": "structured" if structured else "unstructured", "sparsity": sparsity}
    try:
        res = run(load_model(path), PruneOptions(sparsity=sparsity, structured=structured, allow_degraded=True),
                  StepData())
    except EdgecompError as e:
        return {**row, "synthetic": f"refused: {str(e)[:60]}"}
    syn, real = res.evidence["fidelity"], real_fidelity(load_model(path), res.model, data)
    row.update({"syn cos": syn["cosine"], "syn top-1": syn["top-1 agreement"], "synthetic": verdict(syn),
                "real cos": real["cosine"], "real top-1": real["top-1 agreement"], "real": verdict(real),
                "real samples": real["samples"]})
    if row["synthetic"] == "not checked":  # refused like a result below the floor
        row["agree"] = "yes" if row["real"] == "below" else "false alarm"
    elif row["synthetic"] == row["real"]:
        row["agree"] = "yes"
    else:
        row["agree"] = "missed" if row["synthetic"] == "ok" else "false alarm"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--workdir", default=str(ROOT / "out" / "bench_prune_nodata"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    zoo = Zoo(args.workdir)
    rows, skipped = [], []
    for name in args.models.split(","):
        try:
            path, data = zoo.get(name)
        except Exception as e:  # noqa: BLE001 - a zoo entry that cannot be built here (missing weights) is skipped
            skipped.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0]})")
            print(f"skipped {skipped[-1]}", flush=True)
            continue
        for structured in (True, False):
            for s in (0.3, 0.5):
                rows.append(one(name, path, data, structured, s))
                print(rows[-1], flush=True)
    cols = ["model", "pruning", "sparsity", "syn cos", "syn top-1", "synthetic", "real cos", "real top-1", "real",
            "real samples", "agree"]
    checked = [r for r in rows if r.get("agree") in ("yes", "missed", "false alarm")]
    tally = {k: sum(r["agree"] == k for r in checked) for k in ("yes", "missed", "false alarm")}
    body = (f"## Prune without data\n\n{host_line(None)}; {datetime.date.today()}. Reproduce: "
            f"`.venv/bin/python scripts/bench_prune_nodata.py`.\n\n"
            f"`edgecomp prune MODEL -o OUT --sparsity S` without `--data` checks its result on {SYNTHETIC_SAMPLES} "
            f"synthesized inputs (floor {FIDELITY_FLOOR} mean cosine and top-1 agreement; below it the command "
            f"refuses unless `--allow-degraded`). Here the same pruned model is also measured on the zoo model's "
            f"real DATA with the same floor.\n\n" + md_table(rows, cols)
            + f"\n\nOf {len(checked)} checked cases the verdicts agree on {tally['yes']}; the synthetic check "
              f"passed {tally['missed']} that real data fails (missed) and failed {tally['false alarm']} that "
              f"real data passes (false alarm).\n"
            + (f"\nNot built here: {'; '.join(skipped)}.\n" if skipped else ""))
    print(body)
    if not args.no_write:
        update_section("prune-nodata", body)


if __name__ == "__main__":
    main()
