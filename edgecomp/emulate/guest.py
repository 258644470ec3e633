"""Runs inside the emulated aarch64 CPython: needs only onnxruntime and numpy (never edgecomp).

Usage: ``python guest.py SITE_DIR JOB.json``. The job names the model file, an .npz of feeds
(keys ``"<sample index>:<input name>"``), the output folder and the session config. The model is
loaded once; each sample's outputs go to ``OUT/<index>.npz`` (keys ``"<output position>"``,
written to a temporary name then renamed, so a killed run leaves only whole files) and a line
``done <index>`` goes to stdout. Exit 3: onnxruntime cannot load the model; exit 4: a run failed;
the reason is the last stderr line.
"""

import json
import os
import sys


def main(site: str, job_path: str) -> int:
    sys.path.insert(0, site)
    import numpy as np
    import onnxruntime as ort

    with open(job_path) as f:
        job = json.load(f)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in job.get("config", {}).items():
        opts.add_session_config_entry(key, value)
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(job["model"], sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any load failure is reported as one line to the host
        print("LOAD " + (str(e).strip().splitlines() or [type(e).__name__])[0], file=sys.stderr)
        return 3
    samples: dict = {}
    with np.load(job["feeds"], allow_pickle=False) as z:
        for key in z.files:
            index, _, name = key.partition(":")
            samples.setdefault(int(index), {})[name] = z[key]
    names = [o.name for o in session.get_outputs()]
    for index in sorted(samples):
        try:
            outs = session.run(names, samples[index])
        except Exception as e:  # noqa: BLE001
            print("RUN " + (str(e).strip().splitlines() or [type(e).__name__])[0], file=sys.stderr)
            return 4
        path = os.path.join(job["out"], f"{index}.npz")
        with open(path + ".tmp", "wb") as f:
            np.savez(f, **{str(j): np.asarray(o) for j, o in enumerate(outs)})
        os.replace(path + ".tmp", path)
        print(f"done {index}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
