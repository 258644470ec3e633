"""silero-vad quantized with ``--value sr=16000`` on real 16 kHz speech.

The silero-vad files that ship with an ``If`` (the wheel's data folder) are quantized the way a user
would: ``edgecomp quantize FILE --calibration CHUNKS --value sr=16000`` (files without an ``sr``
input without ``--value``). Speech is real synthesized speech: Debian's espeak-ng reads sentences
in several voices, languages and speeds, resampled from 22.05 kHz to 16 kHz, separated by pauses
of 0.3-1.5 s, over background noise at 25 dB SNR. Calibration and evaluation use disjoint
sentences and voices.

Each model streams the evaluation audio as silero's own wrapper does (64 samples of context + a
512-sample chunk, its own state carried from chunk to chunk), fp32 and int8 side by side:

- speech-probability agreement: Pearson correlation and the share of chunks within 0.05 of fp32;
  the mean and the largest absolute difference;
- the speech/non-speech decision at 0.5: the share of chunks where int8 decides as fp32 does;
- latency of one chunk (a mid-speech feed with its real state) relative to the fp32 file,
  interleaved (:func:`edgecomp.measure.bench.compare_latency`: rounds of interleaved runs, the
  ratio of medians per round and its 95% interval), 1 thread; the fp32 model specialized by
  ``edgecomp optimize --value sr=16000`` is timed in the same run;
- file size.

    apt-get install -y espeak-ng   # once
    .venv/bin/python scripts/bench_silero.py            # prints the table; --write updates BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _bench_common import md_table, update_section  # noqa: E402

FILES = ["silero_vad.onnx", "silero_vad_op18_ifless.onnx", "silero_vad_16k_op15.onnx", "silero_vad_half.onnx"]
SR = 16000
CHUNK, CONTEXT = 512, 64

CALIB_TEXT = [
    ("en-us", 160, "The weather service expects light rain in the afternoon, clearing by the evening."),
    ("en+f3", 140, "Please remember to bring your identification card to the front desk."),
    ("de", 150, "Der Zug nach Hamburg hat heute leider zwanzig Minuten Verspätung."),
    ("fr+m3", 150, "Nous avons reçu votre message et nous vous répondrons rapidement."),
    ("es", 155, "El mercado abre a las ocho de la mañana todos los días de la semana."),
    ("en-us+m7", 175, "Seven hundred and forty two people attended the concert on Saturday night."),
]
EVAL_TEXT = [
    ("en", 150, "A quick movement of the enemy will jeopardize six gunboats in the harbour."),
    ("en-us+f2", 165, "Could you tell me how to get to the nearest train station from here?"),
    ("it", 150, "La biblioteca comunale resterà chiusa per lavori fino alla fine del mese."),
    ("nl", 145, "Morgen gaan we met de fiets naar het strand als het mooi weer is."),
    ("en+m3", 130, "Thirteen thousand books were donated to the school library last year."),
    ("pt", 160, "O relatório final será apresentado ao conselho na próxima reunião."),
    ("en-us", 185, "Turn left at the second traffic light, then continue straight for two miles."),
    ("fr", 140, "Il fait beau aujourd'hui, alors nous allons nous promener dans le parc."),
]


def speak(voice: str, speed: int, text: str) -> np.ndarray:
    """espeak-ng's 22.05 kHz WAV of ``text``, resampled to 16 kHz float32."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True,
                       capture_output=True)
        rate, x = wavfile.read(wav)
    x = x.astype(np.float32) / 32768.0
    return resample_poly(x, SR, rate).astype(np.float32)


def recording(lines, seed: int) -> np.ndarray:
    """Utterances separated by pauses, over noise at 25 dB SNR (relative to the speech's RMS)."""
    rng = np.random.default_rng(seed)
    parts = [np.zeros(int(0.5 * SR), np.float32)]
    for voice, speed, text in lines:
        parts += [speak(voice, speed, text), np.zeros(int(rng.uniform(0.3, 1.5) * SR), np.float32)]
    x = np.concatenate(parts)
    speech_rms = float(np.sqrt(np.mean(np.concatenate(parts[1::2]) ** 2)))
    noise = rng.standard_normal(x.size).astype(np.float32)
    noise = np.convolve(noise, np.ones(8) / 8, mode="same")  # a duller, more room-like hiss
    noise *= speech_rms / 10 ** (25 / 20) / float(np.sqrt(np.mean(noise ** 2)))
    return np.clip(x + noise, -1, 1).astype(np.float32)


def stream(path, audio: np.ndarray, with_sr: bool):
    """Speech probabilities chunk by chunk (the model's own state carried), and the feeds."""
    from edgecomp.runtime import make_session

    s = make_session(str(path), threads=1)
    state, context = np.zeros((2, 1, 128), np.float32), np.zeros((1, CONTEXT), np.float32)
    probs, feeds = [], []
    for i in range(audio.size // CHUNK):
        x = np.concatenate([context, audio[None, i * CHUNK:(i + 1) * CHUNK]], axis=1)
        feed = {"input": x, "state": state}
        if with_sr:
            feed["sr"] = np.array(SR, np.int64)
        p, state = s.run(None, feed)[:2]
        probs.append(float(np.ravel(p)[0]))
        feeds.append(feed)
        context = x[:, -CONTEXT:]
    return np.array(probs), feeds


def edgecomp(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecomp.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def bench_file(src: Path, out: Path, calib: np.ndarray, audio: np.ndarray, rounds: int) -> dict:
    import onnx

    from edgecomp.measure.bench import compare_latency

    name = src.stem
    with_sr = any(i.name == "sr" for i in onnx.load(str(src), load_external_data=False).graph.input)
    value = ["--value", f"sr={SR}"] if with_sr else []
    chunks = out / f"{name}_calib"
    if not chunks.exists():
        chunks.mkdir()
        for i, f in enumerate(stream(src, calib, with_sr)[1]):
            np.savez(chunks / f"{i:04d}.npz", **f)
    q_path, o_path = out / f"{name}.int8.onnx", out / f"{name}.sr16k.onnx"
    row = {"file": src.name, "command": "quantize " + " ".join(value)}
    q = edgecomp("quantize", src, "-o", q_path, "--calibration", chunks, *value, "--json", out / f"{name}.json")
    if q.returncode != 0:
        return {**row, "result": "refused: " + q.stderr.strip().splitlines()[-1][:160]}
    if with_sr:
        o = edgecomp("optimize", src, "-o", o_path, *value)
        if o.returncode != 0:
            o_path = None
    report = json.loads((out / f"{name}.json").read_text())
    layers = report["tables"]["layers"]
    p32, feeds = stream(src, audio, with_sr)
    p8, _ = stream(q_path, audio, with_sr)
    d = np.abs(p8 - p32)
    mid = feeds[int(np.argmax(p32))]  # a chunk inside speech, with its real state
    models = [src, *([o_path] if with_sr and o_path else []), q_path]
    est = compare_latency(models, mid, threads=1, runs_per_round=200, min_rounds=rounds, max_rounds=rounds,
                          labels=[str(m) for m in models])
    row.update({
        "result": "works",
        "Ifs inlined": (report.get("specialize") or {}).get("summary", {}).get("Ifs inlined", "—"),
        "conv int8": f"{sum(r['decision'] == 'int8' for r in layers if r['op'] == 'Conv')}/"
                     f"{sum(r['op'] == 'Conv' for r in layers)}",
        "chunks": int(p32.size), "speech chunks (fp32)": int((p32 > 0.5).sum()),
        "prob corr": float(np.corrcoef(p32, p8)[0, 1]), "within 0.05": float((d <= 0.05).mean()),
        "mean abs diff": float(d.mean()), "max abs diff": float(d.max()),
        "decision agreement": float(((p32 > 0.5) == (p8 > 0.5)).mean()),
        "fp32 sr16k latency": est[0].text() if len(est) == 2 else "—",
        "int8 latency": est[-1].text(),
        "size fp32 → int8": f"{src.stat().st_size / 1e6:.2f} → {q_path.stat().st_size / 1e6:.2f} MB",
    })
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "edgecomp-bench-silero"))
    ap.add_argument("--files", default=",".join(FILES))
    ap.add_argument("--rounds", type=int, default=12, help="interleaved latency rounds (200 runs each)")
    ap.add_argument("--write", action="store_true", help="update the silero section of BENCHMARKS.md")
    args = ap.parse_args()
    if not shutil.which("espeak-ng"):
        sys.exit("espeak-ng not found: apt-get install -y espeak-ng")
    from zoo import silero_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib, audio = recording(CALIB_TEXT, seed=1), recording(EVAL_TEXT, seed=2)
    print(f"calibration {calib.size / SR:.1f} s, evaluation {audio.size / SR:.1f} s of speech + pauses", flush=True)
    rows = []
    for f in args.files.split(","):
        rows.append(bench_file(silero_dir() / f, out, calib, audio, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    cols = ["file", "command", "result", "Ifs inlined", "conv int8", "chunks", "speech chunks (fp32)", "prob corr",
            "within 0.05", "mean abs diff", "max abs diff", "decision agreement", "fp32 sr16k latency",
            "int8 latency", "size fp32 → int8"]
    from edgecomp.targets import host_isa

    table = md_table(rows, cols)
    body = (f"## silero-vad int8 with --value sr=16000, real speech\n\n"
            f"`.venv/bin/python scripts/bench_silero.py --write` (host {host_isa().describe()}, 1 thread; "
            f"calibration {calib.size / SR:.1f} s, evaluation {audio.size / SR:.1f} s of espeak-ng speech in "
            f"{len(EVAL_TEXT)} voices/languages with pauses, 25 dB SNR noise; each model streams with its own state; "
            f"latency = the model's over the fp32 file's, interleaved, ratio [95% interval])\n\n{table}")
    print(body)
    if args.write:
        update_section("silero", body)


if __name__ == "__main__":
    main()
