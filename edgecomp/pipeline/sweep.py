"""``edgecomp sweep``: evaluate recipe variants in parallel on Ray and report the Pareto front.

A grid ``quantize.method=minmax,percentile gates.min_speedup=1.2,1.5`` expands to the cartesian
product of its values; each variant is a full ``convert`` into ``OUTDIR/variant-NN`` run as a Ray
task (a local Ray instance by default, an existing cluster with ``address``). As each variant
finishes, ``sweep.json`` is rewritten and, if it is the best so far (gates passed first, then
higher accuracy/fidelity, then lower latency), its model is copied to ``OUTDIR/best.onnx`` —
atomically, so an interrupted sweep keeps the best artifact found until then.

An ``address`` is checked before OUTDIR is touched: malformed, unresolvable, refused, or silent
within ``connect_timeout`` seconds (a plain TCP connect, then an HTTP/2 greeting that a Ray
head's gRPC port answers), each is one line instead of Ray's minutes of connect retries.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from edgecomp.errors import ConfigError
from edgecomp.io import OUTPUT_MARKER, check_output_dir, copy_file, first_line, replace_dir, work_dir
from edgecomp.pipeline.recipe import Recipe, apply_override

__all__ = ["parse_grid", "expand", "run_sweep", "SweepResult", "parse_address", "probe_ray"]


def _value(text: str) -> Any:
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"bad --grid {item!r}; write STEP.OPTION=V1,V2 (e.g. quantize.method=minmax,mse)")
        grid[key.strip()] = [_value(v) for v in values.split(",")]
    if not grid:
        raise ConfigError("give at least one --grid KEY=V1,V2")
    return grid


def expand(recipe: Recipe, grid: dict[str, list[Any]]) -> list[tuple[dict[str, Any], Recipe]]:
    """Every combination of grid values, validated against the recipe before anything runs."""
    variants = []
    for combo in itertools.product(*grid.values()):
        overrides = dict(zip(grid, combo))
        r = recipe
        for k, v in overrides.items():
            r = apply_override(r, k, v)
        variants.append((overrides, r))
    return variants


@dataclasses.dataclass
class SweepResult:
    outdir: str
    variants: list[dict[str, Any]]  # sorted by variant name, each with "pareto": bool
    best: dict[str, Any] | None
    interrupted: bool = False

    @property
    def pareto(self) -> list[str]:
        return [v["variant"] for v in self.variants if v["pareto"]]


def _variant_summary(index: int, overrides: dict[str, Any], result) -> dict[str, Any]:
    base, final = result.baseline(), result.final()
    use_acc = final.accuracy is not None
    return {"variant": f"variant-{index:02d}", **{k: v for k, v in overrides.items()},
            "latency": final.latency_ratio, "quality": final.accuracy if use_acc else final.cos_mean,
            "quality metric": "accuracy" if use_acc else "cosine", "fp32 quality": base.accuracy if use_acc else 1.0,
            "size MB": final.size_bytes / 1e6, "gates passed": result.passed, "model": result.final_model}


def _better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    if b is None:
        return True
    ka = (a["gates passed"], a["quality"] if a["quality"] is not None else -1, -(a["latency"] or 1e9))
    kb = (b["gates passed"], b["quality"] if b["quality"] is not None else -1, -(b["latency"] or 1e9))
    return ka > kb


def parse_address(address: str | None) -> tuple[str, int] | None:
    """(host, port) of a Ray cluster address ``HOST:PORT`` (or ``ray://HOST:PORT``, ``[::1]:PORT``);
    None for a local instance (no address, ``local`` or ``auto``, which Ray resolves itself)."""
    if address is None or address.strip() in ("local", "auto"):
        return None
    text = address.strip()
    text = text[len("ray://"):] if text.startswith("ray://") else text
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or "/" in text or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bad Ray address {address!r}; write HOST:PORT of the head node (e.g. 10.0.0.5:6379), "
                          "or leave it out to start a local Ray")
    return host, int(port)


# The HTTP/2 client preface; a gRPC server (a Ray GCS or Ray client server) answers with a SETTINGS frame.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _as_ray_dials(address: str, host: str, port: int) -> tuple[str, int]:
    """The host Ray itself connects to: it replaces localhost by this node's IP (not for ray://)."""
    if address.strip().startswith("ray://"):
        return host, port
    try:
        from ray._private.services import resolve_ip_for_localhost

        return resolve_ip_for_localhost(host), port
    except Exception:  # a private helper; without it, probe the address as given
        return host, port


def _ray_init(ray, init: dict[str, Any], address: str | None) -> None:
    """``ray.init``; connecting to ``address``, one attempt of Ray's GCS connect loop (the address was
    probed already; its default is 20 attempts of about 40 s) and a failure in one line."""
    if address is None:
        ray.init(**init)
        return
    key = "RAY_gcs_server_port_wait_time_s"  # read by ray.init at call time: its number of connect attempts
    saved = os.environ.get(key)
    if saved is None:
        os.environ[key] = "1"
    try:
        ray.init(**init)
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"cannot connect to the Ray cluster at {address} ({first}); check that a Ray "
                          "cluster of the same Ray version runs there, or drop --address") from None
    finally:
        if saved is None:
            os.environ.pop(key, None)


def probe_ray(host: str, port: int, timeout: float = 30.0, shown: str | None = None) -> None:
    """Refuse, within ``timeout`` seconds, an address where no Ray cluster answers.

    ``ray.init`` retries a dead address for many minutes; this opens a plain TCP connection and
    checks that a gRPC server (what a Ray head listens with) answers there. With TLS
    (``RAY_USE_TLS``) only the TCP connection is checked.
    """
    where = shown or f"{host}:{port}"
    hint = "start one with 'ray start --head' or drop --address"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve the Ray cluster host {host!r} ({e.strerror}); check the address or drop --address") from None
    except (socket.timeout, TimeoutError):
        raise ConfigError(f"cannot reach a Ray cluster at {where} within {timeout:g} s; {hint}") from None
    except OSError as e:
        raise ConfigError(f"cannot reach a Ray cluster at {where} ({e.strerror or type(e).__name__}); {hint}") from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            sock.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError:  # includes timeouts
            head = b""
    if len(head) < 9 or head[3] != 0x04:  # frame type 4: SETTINGS
        raise ConfigError(f"{where} accepts connections but no Ray cluster answers there within {timeout:g} s; "
                          "give the head node's GCS port (default 6379), or drop --address to start a local Ray")


def _convert_variant(index: int, overrides, recipe, source, outdir, kwargs) -> dict[str, Any]:
    from edgecomp.pipeline.convert import convert

    res = convert(source, recipe, Path(outdir) / f"variant-{index:02d}", **kwargs)
    return _variant_summary(index, overrides, res)


def run_sweep(source, recipe: Recipe, grid: dict[str, list[Any]], outdir: str | os.PathLike, *,
              address: str | None = None, max_parallel: int = 2, overwrite: bool = False,
              connect_timeout: float = 30.0,
              on_result: Callable[[dict[str, Any]], None] | None = None, **convert_kwargs: Any) -> SweepResult:
    """Run every variant of ``grid`` on Ray into ``outdir`` (see the module docstring).

    With ``address``, the cluster must answer within ``connect_timeout`` seconds (checked before
    OUTDIR is touched); Ray itself would retry for many minutes.
    """
    from edgecomp.io import write_json, write_text
    from edgecomp.render.html import html_table, tradeoff_svg

    if not connect_timeout > 0:  # also refuses NaN
        raise ConfigError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
    hostport = parse_address(address)
    variants = expand(recipe, grid)
    data = [convert_kwargs.get(k) for k in ("calibration", "eval_data", "labels", "text", "tokenizer")]
    out = check_output_dir(outdir, [*data, source.hf, source.spec_file(), recipe.source,
                                    *convert_kwargs.get("protect", ())], overwrite)
    try:
        import ray
    except ImportError as e:
        raise ConfigError("sweep needs Ray: pip install 'edgecomp[sweep]'") from e
    if hostport:
        probe_ray(*_as_ray_dials(address, *hostport), timeout=connect_timeout, shown=address.strip())
    env = {"PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    init = dict(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                runtime_env={"env_vars": env})
    if address is None:
        init["num_cpus"] = max_parallel
    _ray_init(ray, init, address)  # before any folder is made: a cluster that cannot be reached leaves OUTDIR alone
    task = ray.remote(num_cpus=1, max_retries=0)(_convert_variant)
    kwargs = dict(convert_kwargs, overwrite=False)
    done: list[dict[str, Any]] = []
    best = None
    interrupted = False
    try:
        # built beside OUTDIR and swapped in at the end: an old sweep is replaced only by a whole new one
        with work_dir(out) as work:
            _write_sweep(work, [], None, write_json, write_text, html_table, tradeoff_svg)
            pending = {task.remote(i, ov, r, source, str(work), kwargs): i for i, (ov, r) in enumerate(variants, 1)}
            try:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    ref = ready[0]
                    index = pending.pop(ref)
                    try:
                        summary = ray.get(ref)
                    except Exception as e:  # one failed variant does not stop the sweep
                        cause = getattr(e, "cause", None) or e
                        summary = {"variant": f"variant-{index:02d}", **variants[index - 1][0],
                                   "error": first_line(cause), "gates passed": False, "quality": None, "latency": None}
                    done.append(summary)
                    if "error" not in summary and _better(summary, best):
                        best = summary
                        copy_file(summary["model"], work / "best.onnx")
                    _write_sweep(work, done, best, write_json, write_text, html_table, tradeoff_svg)
                    if on_result:
                        on_result(summary)
            except KeyboardInterrupt:  # the variants done so far are kept
                interrupted = True
                for ref in pending:
                    ray.cancel(ref, force=True)
            replace_dir(work, out)
    finally:
        ray.shutdown()
    return SweepResult(str(out), _marked(done), best, interrupted)


def _marked(done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Variants sorted by name, each marked whether it is on the latency/quality Pareto front."""
    from edgecomp.render.text import pareto_front

    ok = [d for d in done if d.get("latency") is not None and d.get("quality") is not None]
    front = {ok[i]["variant"] for i in pareto_front([(d["latency"], d["quality"]) for d in ok])}
    return [{**d, "pareto": d["variant"] in front} for d in sorted(done, key=lambda d: d["variant"])]


def _write_sweep(out: Path, done, best, write_json, write_text, html_table, tradeoff_svg) -> None:
    ok = [d for d in done if d.get("latency") is not None and d.get("quality") is not None]
    rows = [{k: v for k, v in d.items() if k != "model"} for d in _marked(done)]
    write_json(out / "sweep.json", {OUTPUT_MARKER: "sweep", "variants": rows, "best": best})
    svg = tradeoff_svg([{"label": d["variant"], "latency": d["latency"], "quality": d["quality"]} for d in ok],
                       ok[0]["quality metric"] if ok else "quality") or ""
    best_line = f"best so far: {best['variant']} → best.onnx" if best else "no successful variant yet"
    write_text(out / "sweep.html", f"<!doctype html><html><head><meta charset='utf-8'><title>edgecomp sweep</title>"
                                    f"</head><body><h1>edgecomp sweep</h1><p>{best_line}</p>{html_table(rows)}{svg}</body></html>")
