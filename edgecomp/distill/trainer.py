"""The distillation training loop: setup checks, CPU training, early stopping, checkpoints, resume.

``prepare(config)`` builds teacher, student and samples and checks everything that can be
checked before training (one-line errors): student outputs shaped like the teacher's, data
keyed by the teacher's inputs, enough samples for a batch. ``train(config)`` then runs the chosen
optimizer (:mod:`edgecomp.distill.optim`: AdamW by default, Adam, SGD, full-batch GD) with linear
warmup and cosine decay over a fixed, seeded sample order; every
``checkpoint_every`` steps it writes (atomically) the student, optimizer, scheduler, RNG states
and the step, with a hash of the configuration and data. ``--resume`` refuses a checkpoint
whose hash differs and otherwise continues bit-identically to an uninterrupted run (same
batches, same dropout masks, same updates). A checkpoint holds tensors and plain values only
and is read with ``torch.load(weights_only=True)``: a file that would build any other object
(and so could run code) is refused before anything in it runs.

The teacher may be an ONNX file, and so may the student (e.g. a model cut by ``edgecomp prune``,
healed against the unpruned one): each runs as an ``OnnxModule``, the student's float
initializers trained. Their files are hashed into the configuration, so a checkpoint is not
resumed against a changed file.

Early stopping watches fidelity to the teacher on the held-out split: top-1 agreement for
logits (ties broken by the lower held-out loss), mean cosine for embeddings. The student as
given is evaluated first (step 0) and competes with every later evaluation, so training that
only hurts it (a small corpus memorized, a learning rate too high for a repaired student) hands
back the student unchanged (``TrainResult.kept_input``); otherwise the student handed back
carries the weights of the best evaluation.

Under ``torch.distributed`` (gloo) each process takes an equal share of every global batch and
DDP averages the gradients, so N processes compute what one process does with the same global
batch, up to float summation order.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from edgecomp.distill.config import DistillConfig, is_onnx_file
from edgecomp.distill.losses import DistillLoss, LossWeights, match_loss, soft_target_kl
from edgecomp.distill.optim import make_optimizer, schedule, steps_per_epoch, train_new_rows
from edgecomp.distill.samples import Samples, epoch_order, from_data, from_text
from edgecomp.distill.students import find_layer_stack, layer_map, parse_shrink, shrink
from edgecomp.errors import DataError, DistillError, InputFileError, OptionError
from edgecomp.io import first_line

__all__ = ["Setup", "TrainResult", "prepare", "train", "check_resume", "CHECKPOINT_FORMAT", "rng_state", "set_rng_state",
           "save_checkpoint", "seed_all"]

#: 2: every value loads with ``torch.load(weights_only=True)`` (RNG states as tensors and lists).
CHECKPOINT_FORMAT = 2

@dataclasses.dataclass
class Setup:
    config: DistillConfig
    teacher: nn.Module
    student: nn.Module
    example: Any                        # the teacher factory's example inputs (or None)
    input_names: list[str]
    train: Samples
    held: Samples
    objective: str
    loss: DistillLoss
    hidden_pairs: list[tuple[int, int]]  # (student layer, teacher layer) for hidden-state matching
    config_hash: str
    held_rows: list = dataclasses.field(default_factory=list)  # train_rows new: edgecomp.distill.optim.RowsHeld
    hidden_plan: Any = None              # ONNX models: the boundaries (edgecomp.distill.blockwise) the pairs index


@dataclasses.dataclass
class TrainResult:
    student: nn.Module
    steps: int
    best_step: int | None
    stopped_early: bool
    resumed_from: int | None
    seconds: float
    history: list[dict[str, float]]
    device: str = "cpu"
    kept_input: bool = False            # no evaluation beat the student as given: it is handed back unchanged


# --- setup ------------------------------------------------------------------------------------

def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DistillError(f"the model returned {type(out).__name__}; distillation needs a tensor (or a tuple whose first item is one)")


def _input_names(module: nn.Module, example: Any) -> list[str]:
    from edgecomp.distill.onnx_module import OnnxModule
    from edgecomp.export import forward_names

    if isinstance(module, OnnxModule):
        return list(module.input_names)
    if isinstance(example, Mapping):
        return list(example)
    if example is not None:
        n = 1 if isinstance(example, torch.Tensor) else len(example)
        return forward_names(module, n)
    import inspect

    return [p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


class _Projected(nn.Module):
    """A student followed by a learned linear map to the teacher's output width (exported with it)."""

    def __init__(self, student: nn.Module, d_in: int, d_out: int):
        super().__init__()
        self.student, self.projection = student, nn.Linear(d_in, d_out)

    def forward(self, *args):
        return self.projection(_first_output(self.student(*args)))


def _load_teacher(c: DistillConfig):
    from edgecomp.export import call_factory, hf_encoder, load_spec

    if c.teacher_hf:
        module, example = hf_encoder(c.teacher_hf)
        return module, example, None
    if is_onnx_file(c.teacher):
        from edgecomp.distill.onnx_module import OnnxModule
        from edgecomp.io import load_model

        return OnnxModule(load_model(c.teacher), source=f"teacher {c.teacher}"), None, None
    factory = load_spec(c.teacher)
    module, example = call_factory(factory, c.teacher)
    return module, example, factory


def _onnx_student(path: str, names: list[str]) -> nn.Module:
    """The student ONNX file as a trainable module, called with the teacher's inputs in the teacher's order."""
    from edgecomp.distill.onnx_module import OnnxModule, graph_input_names
    from edgecomp.io import load_model

    model = load_model(path)
    got = graph_input_names(model)
    if sorted(got) != sorted(names):
        raise DistillError(f"the student {path} takes inputs {got} but the teacher takes {names}; "
                           "give a student with the teacher's input names")
    return OnnxModule(model, input_order=names, source=f"student {path}")


def _file_digests(c: DistillConfig) -> dict[str, str]:
    """A hash of each ONNX file used as teacher or student (a checkpoint must not resume against another)."""
    out = {}
    for role, ref in (("teacher", c.teacher), ("student", c.student)):
        if is_onnx_file(ref):
            out[role] = hashlib.sha256(Path(ref).read_bytes()).hexdigest()[:16]
    return out


def _load_samples(c: DistillConfig) -> Samples:
    if c.data:
        return from_data(c.data, c.labels)
    return from_text(c.text, c.tokenizer or c.teacher_hf, c.max_len, c.labels)


def prepare(config: DistillConfig) -> Setup:
    """Build teacher, student and samples; raise a one-line error for anything inconsistent."""
    from edgecomp.export import call_factory, load_spec

    c = config
    c.check()
    rule = parse_shrink(c.shrink) if c.shrink else None
    seed_all(c.seed)
    teacher, example, factory = _load_teacher(c)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    names = _input_names(teacher, example)
    samples = _load_samples(c)
    if set(samples.names) != set(names):
        missing, extra = sorted(set(names) - set(samples.names)), sorted(set(samples.names) - set(names))
        raise DataError(f"the samples are keyed {sorted(samples.names)} but the teacher's inputs are {names} "
                        f"(missing {missing}, unexpected {extra}); rename the arrays")
    train_s, held = samples.split(c.held_out, c.seed)
    if len(train_s) < c.batch_size:
        raise OptionError("batch_size", f"{c.batch_size} is more than the {len(train_s)} training samples; "
                                        "give more data or a smaller batch")

    seed_all(c.seed)  # the student's initialization depends on the seed only
    if rule is not None:
        student = shrink(teacher, rule, factory)
    elif is_onnx_file(c.student):
        student = _onnx_student(c.student, names)
    else:
        student, _ = call_factory(load_spec(c.student), c.student)
    for p in student.parameters():
        p.requires_grad_(True)

    probe = train_s.batch(range(min(2, len(train_s))))
    args = [probe[n] for n in names]
    student.eval()
    with torch.no_grad():
        try:
            t_out = teacher(*args)
        except Exception as e:
            raise DistillError(f"the teacher cannot run on the samples {names}: {type(e).__name__}: {first_line(e, 300)}") from e
        t_out = _first_output(t_out)
        try:
            s_out = _first_output(student(*args))
        except Exception as e:
            raise DistillError(f"the student cannot run on the teacher's inputs {names}: {type(e).__name__}: "
                               f"{first_line(e, 300)}") from e
    if s_out.shape != t_out.shape:
        if c.project and s_out.dim() == 2 and t_out.dim() == 2:
            student = _Projected(student, s_out.shape[1], t_out.shape[1])
        elif s_out.dim() == 2 and t_out.dim() == 2:
            raise OptionError("project", f"is off and the student's output {list(s_out.shape)} does not match the "
                                         f"teacher's {list(t_out.shape)}; turn it on to learn a linear map, or give a "
                                         "student with the teacher's output shape")
        else:
            raise DistillError(f"the student's output {list(s_out.shape)} does not match the teacher's "
                               f"{list(t_out.shape)}; give a student with the teacher's output shape")
    objective = c.objective
    if objective == "auto":
        unit = t_out.dim() == 2 and torch.allclose(t_out.norm(dim=1), torch.ones(t_out.shape[0]), atol=1e-3)
        objective = "logits" if t_out.dim() == 2 and not unit else "embeddings"
    if samples.labels is not None and objective != "logits":
        raise OptionError("labels", "need a teacher whose output is class logits; leave them out for embeddings")

    pairs: list[tuple[int, int]] = []
    hidden_plan = None
    if c.hidden_weight > 0 and is_onnx_file(c.teacher) and is_onnx_file(c.student):
        from edgecomp.distill.blockwise import hidden_boundaries, hidden_plan as plan_hidden

        hidden_plan = plan_hidden(student, teacher, args, c.student)  # matched at the block boundaries
        pairs = [(i, i) for i in range(len(hidden_boundaries(hidden_plan, list(student.output_names))))]
    elif c.hidden_weight > 0:
        if is_onnx_file(c.teacher) or is_onnx_file(c.student):
            raise OptionError("hidden_weight", "needs torch modules with a layer stack, or an ONNX student pruned "
                                               "from an ONNX teacher; with one ONNX model set it to 0")
        ts, ss = find_layer_stack(teacher), find_layer_stack(student, min_len=1)
        if ts is None or ss is None:
            raise OptionError("hidden_weight", "needs teacher and student with a stack of repeated layers; set it to 0")
        pairs = list(enumerate(layer_map(len(ts[1]), len(ss[1]))))

    _freeze_unused(student, args)
    held_rows = []
    if c.train_rows == "new":
        if not is_onnx_file(c.student):
            raise OptionError("train_rows", "new needs an ONNX student (the output of reduce-embeddings --add-tokens), "
                                            "which records the rows it added")
        from edgecomp.io import load_model

        held_rows = train_new_rows(student, load_model(c.student))
    weights = LossWeights(kd=c.kd_weight, match=c.match_weight, hidden=c.hidden_weight,
                          ce=c.ce_weight if samples.labels is not None else 0.0)
    loss = DistillLoss(objective, weights, c.temperature, c.match)
    hashed = {"config": c.hashed(), "data": samples.fingerprint(), "format": CHECKPOINT_FORMAT}
    digests = _file_digests(c)
    if digests:  # absent for SPECs, so their checkpoints keep their hash
        hashed["models"] = digests
    blob = json.dumps(hashed, sort_keys=True, default=str)
    return Setup(c, teacher, student, example, names, train_s, held, objective, loss, pairs,
                 hashlib.sha256(blob.encode()).hexdigest()[:16], held_rows, hidden_plan)


def _freeze_unused(student: nn.Module, args: list[torch.Tensor]) -> None:
    """Parameters that get no gradient (e.g. a BERT pooler the sentence embedding skips) are
    frozen: DDP requires every trained parameter to receive one."""
    student.eval()
    out = _first_output(student(*args))
    out.float().sum().backward()
    for p in student.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
        p.grad = None


# --- checkpoints ------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain values, so a checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": int(version), "internal": [int(v) for v in internal],
                       "gauss_next": None if gauss_next is None else float(gauss_next)}}


def set_rng_state(s: Mapping[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = s["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


#: What a checkpoint holds (all tensors, containers of tensors, or plain values).
_CHECKPOINT_KEYS = ("format", "config_hash", "config", "step", "model", "optimizer", "scheduler", "rng", "best_key",
                    "best_step", "best_state", "bad_evals", "history", "stopped")


def check_resume(path: str | os.PathLike, setup: Setup) -> dict[str, Any]:
    """Load a checkpoint, refusing one written for another configuration or other data."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"no checkpoint at {p} to resume from; run without --resume (or give --checkpoint)")
    # weights_only: the file may hold only tensors and plain values; a pickle that would build any
    # other object (and so could run code) is refused before anything in it runs.
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DistillError(f"cannot read checkpoint {p} as tensors and plain values ({type(e).__name__}; an older "
                           "edgecomp's checkpoint or not a checkpoint, nothing in it was run); delete it and start again") from e
    if (not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT
            or any(k not in ckpt for k in _CHECKPOINT_KEYS) or not isinstance(ckpt["config"], dict)):
        raise DistillError(f"{p} is not an edgecomp distill checkpoint of format {CHECKPOINT_FORMAT}; "
                           "delete it or give another --checkpoint")
    if ckpt["config_hash"] != setup.config_hash:
        now = setup.config.hashed()
        diff = sorted(k for k in set(now) | set(ckpt["config"]) if now.get(k) != ckpt["config"].get(k))
        models = " or an ONNX model file changed" if _file_digests(setup.config) else ""
        what = f"options differ: {', '.join(diff)}" if diff else f"the data differs{models}"
        raise DistillError(f"checkpoint {p} was written by another configuration ({what}); "
                           "resume with the same options and data, or start again without --resume")
    return ckpt


@contextlib.contextmanager
def _damaged(path: Path):
    """A checkpoint that loads but whose values do not fit this run: one line, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise DistillError(f"checkpoint {path} is damaged or does not fit this run ({type(e).__name__}: "
                           f"{first_line(e, 200)}); delete it and start again") from e


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    from edgecomp.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# --- training ---------------------------------------------------------------------------------

class _HiddenTaps:
    """Forward hooks that keep the outputs of chosen layers of a layer stack."""

    def __init__(self, model: nn.Module, indices: list[int]):
        _, stack = find_layer_stack(model, min_len=1)
        self.values: dict[int, torch.Tensor] = {}
        self._handles = [stack[i].register_forward_hook(self._hook(i)) for i in sorted(set(indices))]

    def _hook(self, i: int):
        def keep(_mod, _inp, out):
            self.values[i] = out[0] if isinstance(out, (tuple, list)) else out
        return keep

    def take(self, indices: list[int]) -> list[torch.Tensor]:
        vals = [self.values[i] for i in indices]
        self.values = {}
        return vals

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _outputs(model: nn.Module, samples: Samples, names: list[str], batch: int = 64) -> list[torch.Tensor]:
    """Per-sample outputs ([1, ...] each) in sample order, without gradients (batched by size)."""
    order = np.argsort(samples.sizes(), kind="stable")
    outs: list[torch.Tensor | None] = [None] * len(samples)
    with torch.no_grad():
        device = next(model.parameters(), torch.empty(0)).device
        for i in range(0, len(samples), batch):
            idx = order[i:i + batch]
            b = _on(samples.batch(idx), device)
            for j, o in zip(idx, _first_output(model(*[b[n] for n in names])).split(1)):
                outs[j] = o
    return outs


def _score(setup: Setup, student: nn.Module, targets: list[torch.Tensor]) -> dict[str, float]:
    """Fidelity of the student to the teacher on the held-out samples."""
    student.eval()
    got = torch.cat(_outputs(student, setup.held, setup.input_names)).flatten(1)
    ref = torch.cat(targets).flatten(1)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    if setup.objective == "logits":
        loss = soft_target_kl(got, ref, setup.loss.temperature)
    else:
        loss = match_loss(got, ref, setup.loss.match)
    rec = {"held-out cos": float(cos.mean()), "held-out loss": float(loss)}
    if setup.objective == "logits":
        rec["top-1 agreement"] = float((got.argmax(1) == ref.argmax(1)).float().mean())
    student.train()
    return rec


def _fidelity_key(objective: str, rec: Mapping[str, float]) -> tuple[float, ...]:
    if objective == "logits":
        return (rec["top-1 agreement"], -rec["held-out loss"])
    return (rec["held-out cos"],)


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA GPU when torch sees one, else the CPU; ``cuda`` without one is refused."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DistillError(f"device {name}: torch {torch.__version__} ({build}) sees no CUDA GPU here; "
                               "use device cpu or auto")
        try:
            return torch.device(name)
        except RuntimeError as e:
            raise DistillError(f"device {name!r} is not a valid torch device ({e})") from None
    raise DistillError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")


def _on(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(config: DistillConfig, *, setup: Setup | None = None, resume: bool = False,
          callback: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train the student; under an initialized torch.distributed group, data-parallel.

    ``callback(step, record)`` runs after every optimizer step (the tests interrupt a run with it).
    """
    c = config
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if c.threads:
        torch.set_num_threads(c.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(c, setup or prepare(c), resume, callback)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def _train(c: DistillConfig, setup: Setup, resume: bool, callback) -> TrainResult:
    t0 = time.perf_counter()
    rank, world = _dist()
    if c.batch_size % world:
        raise OptionError("batch_size", f"{c.batch_size} is not divisible by the {world} processes; "
                                        "every process takes an equal share of each batch")
    ckpt_path = Path(c.checkpoint) if c.checkpoint else None
    ckpt = check_resume(ckpt_path, setup) if resume else None
    student, teacher, names = setup.student, setup.teacher, setup.input_names
    device = resolve_device(c.device)
    if device.type == "cuda" and world > 1:
        raise DistillError("data-parallel training runs on CPU processes (gloo); use one process with device cuda")
    student.to(device)
    teacher.to(device)
    # bf16 autocast on CUDA (mixed precision: matmuls in bf16, reductions and the optimizer in fp32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    full_batch = c.optimizer == "gd"
    if full_batch and world > 1:
        raise OptionError("optimizer", "gd takes every training sample in each step in one process; "
                                       "use one process (nproc 1) or another optimizer")
    per_epoch = steps_per_epoch(c.optimizer, len(setup.train), c.batch_size)
    total = c.max_steps or c.epochs * per_epoch
    eval_every = c.eval_every or per_epoch
    params = [p for p in student.parameters() if p.requires_grad]
    opt = make_optimizer(params, c.optimizer, c.lr, c.weight_decay, c.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(total, c.warmup))

    cache = not setup.hidden_pairs  # teacher outputs depend only on the sample: compute them once
    held_targets = _outputs(teacher, setup.held, names) if len(setup.held) else []
    train_targets = _outputs(teacher, setup.train, names) if cache else None

    step, best_key, best_step, best_state, bad, history, stopped = 0, None, None, None, 0, [], False
    rng_states = None
    if ckpt is not None:
        with _damaged(ckpt_path):
            student.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            step, best_step, bad, history, stopped = (int(ckpt["step"]), ckpt["best_step"], int(ckpt["bad_evals"]),
                                                      list(ckpt["history"]), bool(ckpt["stopped"]))
            best_key = tuple(ckpt["best_key"]) if ckpt["best_key"] is not None else None
            best_state = ckpt["best_state"]
            rng_states = list(ckpt["rng"])
    elif len(setup.held):  # step 0: the student as given competes with every later evaluation
        rec0 = {"step": 0, **_score(setup, student, held_targets)}
        history.append(rec0)
        best_key, best_step, best_state = _fidelity_key(setup.objective, rec0), 0, copy.deepcopy(student.state_dict())
    model = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(student)
    if rng_states is not None:
        with _damaged(ckpt_path):
            set_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])

    taps_s = taps_t = None
    if setup.hidden_plan is not None:  # ONNX models: their block boundaries
        from edgecomp.distill.blockwise import BoundaryTaps

        taps_s, taps_t = (BoundaryTaps(student, setup.hidden_plan, teacher=False),
                          BoundaryTaps(teacher, setup.hidden_plan, teacher=True))
    elif setup.hidden_pairs:
        taps_s = _HiddenTaps(student, [j for j, _ in setup.hidden_pairs])
        taps_t = _HiddenTaps(teacher, [i for _, i in setup.hidden_pairs])
    bar = None
    if c.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, unit="step", desc=f"distilling on {device}", dynamic_ncols=True,
                   disable=None)  # no bar when stderr is not a terminal
    resumed_from = step if ckpt is not None else None
    student.train()
    local = c.batch_size // world
    sizes = setup.train.sizes()
    tick, seen = time.perf_counter(), 0

    def chunk_loss(idx) -> tuple[torch.Tensor, dict[str, float]]:
        batch = _on(setup.train.batch(idx), device)
        args = [batch[n] for n in names]
        labels = setup.train.batch_labels(idx)
        labels = labels.to(device) if labels is not None else None
        with autocast:
            s_out = _first_output(model(*args))
            if cache:
                t_out = torch.cat([train_targets[i] for i in idx])
            else:
                with torch.no_grad():
                    t_out = _first_output(teacher(*args))
            s_hid = taps_s.take([j for j, _ in setup.hidden_pairs]) if taps_s else []
            t_hid = taps_t.take([i for _, i in setup.hidden_pairs]) if taps_t else []
        return setup.loss(s_out.float(), t_out.float(), labels, [h.float() for h in s_hid],
                          [h.float() for h in t_hid], batch.get("attention_mask"))

    try:
        while step < total and not stopped:
            if full_batch:  # the mean loss over every training sample, accumulated chunk by chunk
                n = len(setup.train)
                chunks = [np.arange(i, min(n, i + c.batch_size)) for i in range(0, n, c.batch_size)]
            else:
                epoch, pos = divmod(step, per_epoch)
                order = epoch_order(len(setup.train), c.seed, epoch, sizes, c.batch_size)
                chunks = [order[pos * c.batch_size:(pos + 1) * c.batch_size][rank * local:(rank + 1) * local]]
            opt.zero_grad(set_to_none=True)
            loss, parts, count = torch.zeros(()), {}, sum(len(i) for i in chunks)
            for idx in chunks:
                share = len(idx) / count
                part_loss, part = chunk_loss(idx)
                (part_loss * share).backward()
                loss = loss + part_loss.detach().cpu() * share
                parts = {k: parts.get(k, 0.0) + v * share for k, v in part.items()}
            if c.grad_clip:
                nn.utils.clip_grad_norm_(params, c.grad_clip)
            opt.step()
            for rows in setup.held_rows:  # train_rows new: the old rows stay as they were
                rows.restore()
            sched.step()
            step += 1
            seen += count * world
            rec = {"step": step, "loss": float(loss.detach()), **parts}
            if step % eval_every == 0 or step == total:
                if len(setup.held):
                    rec.update(_score(setup, student, held_targets))
                    key = _fidelity_key(setup.objective, rec)
                    if best_key is None or key > best_key:
                        best_key, best_step, bad = key, step, 0
                        best_state = copy.deepcopy(student.state_dict())
                    else:
                        bad += 1
                        stopped = c.patience is not None and bad >= c.patience
                history.append(rec)
            if bar is not None:
                rate = seen / max(1e-9, time.perf_counter() - tick)
                bar.set_postfix_str(f"loss {rec['loss']:.4f} {rate:.0f} samples/s"
                                    + (f" held-out cos {rec['held-out cos']:.4f}" if "held-out cos" in rec else ""))
                bar.update(1)
            if ckpt_path is not None and (step % c.checkpoint_every == 0 or step == total or stopped):
                rng = [rng_state()]
                if world > 1:
                    rng = [None] * world
                    torch.distributed.all_gather_object(rng, rng_state())
                if rank == 0:
                    save_checkpoint(ckpt_path, {
                        "format": CHECKPOINT_FORMAT, "config_hash": setup.config_hash, "config": c.hashed(),
                        "step": step, "model": student.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "rng": rng, "best_key": best_key, "best_step": best_step,
                        "best_state": best_state, "bad_evals": bad, "history": history, "stopped": stopped})
            if callback is not None:
                callback(step, rec)
    finally:
        if bar is not None:
            bar.close()
        for taps in (taps_s, taps_t):
            if taps is not None:
                taps.remove()
    if best_state is not None:
        student.load_state_dict(best_state)
    student.to("cpu").eval()  # exported and validated on the CPU
    teacher.to("cpu")
    return TrainResult(student, step, best_step, stopped, resumed_from, time.perf_counter() - t0, history, str(device),
                       kept_input=best_step == 0)
