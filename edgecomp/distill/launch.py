"""Data-parallel training through torchrun's own machinery (``torch.distributed.launcher``).

``--nproc N`` starts N local worker processes with gloo on 127.0.0.1. For several machines,
``--nnodes`` and ``--rdzv-endpoint HOST:PORT`` (and ``--rdzv-id``) go to torchrun's c10d
rendezvous unchanged: run the same command on every machine. Each worker rebuilds the setup
from the plain configuration and trains its share of every batch; the process of global rank 0
writes checkpoints and hands the trained student back.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["launch"]


def _worker(config: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    import torch.distributed as dist

    from edgecomp.distill.config import DistillConfig
    from edgecomp.distill.trainer import train

    cfg = DistillConfig(**config)
    if not cfg.threads:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cfg = dataclasses.replace(cfg, threads=max(1, (os.cpu_count() or 1) // local))
    dist.init_process_group("gloo")
    try:
        result = train(cfg, resume=resume)
        if dist.get_rank() != 0:
            return None
        state = {k: v.detach().clone() for k, v in result.student.state_dict().items()}
        return {"state": state, **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                                   if f.name != "student"}}
    finally:
        dist.barrier()
        dist.destroy_process_group()


def launch(config, nproc: int, *, nnodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
           resume: bool = False) -> dict[str, Any] | None:
    """Train with ``nproc`` processes per machine; rank 0's result, or None on the other machines."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from edgecomp.errors import DistillError, OptionError
    from edgecomp.io import first_line

    for option, n in (("nproc", nproc), ("nnodes", nnodes)):
        if n < 1:
            raise OptionError(option, f"must be >= 1, got {n}")
    if nnodes > 1 and not rdzv_endpoint:
        raise OptionError("rdzv_endpoint", f"is needed with {nnodes} machines (nnodes): HOST:PORT, the same on "
                                           "every machine")
    local = nnodes == 1 and not rdzv_endpoint
    if local:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on the loopback interface
    lc = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, rdzv_backend="c10d",
                      rdzv_endpoint=rdzv_endpoint or "127.0.0.1:0", run_id=rdzv_id or "edgecomp-distill",
                      max_restarts=0, start_method="spawn", monitor_interval=0.1,
                      local_addr="127.0.0.1" if local else None)
    try:
        results = elastic_launch(lc, _worker)(dataclasses.asdict(config), resume)
    except Exception as e:
        why = f"{type(e).__name__}: {first_line(e, 300)}" if str(e).strip() else type(e).__name__
        raise DistillError(f"distributed training failed: {why}") from e
    return results.get(0)
