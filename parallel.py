"""Data parallelism on PyTorch's own engine (torch.distributed), in the few calls GRPO needs.

    torchrun --nproc-per-node 8 train.py --strategy uniform            # one machine, 8 GPUs
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 8 train.py ...   # two machines

Each rank takes an equal, contiguous share of the step's prompts (--prompts-per-step must divide by
the number of processes), so a group of K completions never spans ranks and its advantages stay
exact. The loss each rank backpropagates is its share of the whole batch's loss (the normalisers,
sequences and tokens, are summed over ranks first), so one all-reduce SUM of the LoRA gradients
gives every rank exactly the single-process gradient; the profiler then records that all-reduced
gradient and every rank takes the same optimiser step.
NCCL on GPUs, gloo on CPUs. Without torchrun (WORLD_SIZE unset) every function here is a no-op.

The run is the single-process run, split: the data order is the single-process order, and sampling
noise is drawn for the whole global batch from a generator reseeded from (seed, step) every step, each
rank using its own rows, so the completions are the ones one process would sample. Evaluation is
sharded and gathered; only rank 0 writes the run folder; every rank resumes from the same checkpoint.
Tested on the CPU with 2 gloo processes: adapters, gradient profile, metrics and evaluation equal the
single-process run's (largest adapter difference 8e-7), and resuming works.

Left out: model sharding (FSDP, tensor parallelism): the frozen model fits on one device.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str | None) -> torch.device:
    """Join the process group torchrun describes (if any); returns this rank's device."""
    want_cuda = device != "cpu" and torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not active():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device or "cpu")


def shard(items: list, what: str = "prompts per step") -> list:
    """This rank's contiguous equal share of `items`."""
    n, w, r = len(items), world(), rank()
    if n % w:
        raise ValueError(f"{what} ({n}) must be a multiple of the number of processes ({w})")
    return items[r * n // w:(r + 1) * n // w]


def sum_int(x: int) -> int:
    """The sum of an integer over ranks."""
    if not active():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return int(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over ranks (a copy; the input is left alone)."""
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def all_reduce_grads(params: list[torch.nn.Parameter]):
    """Sum every gradient over ranks, flattened into one buffer: one collective, not one per tensor."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def broadcast(tensors: list[torch.Tensor]):
    """Overwrite every rank's tensors with rank 0's (the starting adapters)."""
    if active():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (picklable objects: metrics, eval records)."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def merge_metrics(parts: list[dict]) -> dict:
    """One step's metrics from every data-parallel rank: token counts add up, maxima are maxima, and
    the rest are means over ranks (exact for means over equal shares; a std becomes the mean std)."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for k, v in parts[0].items():
        vals = [p[k] for p in parts]
        if not isinstance(v, (int, float)) or k in ("lr", "loss", "grad_norm", "kl", "clip_frac", "entropy",
                                      "logp_mismatch_mean", "is_weight_mean"):
            out[k] = v  # identical on every rank (all-reduced), or not a number
        elif k == "tokens":
            out[k] = sum(vals)
        elif k.endswith("_max") or k.startswith("time"):
            out[k] = max(vals)
        else:
            out[k] = sum(vals) / len(vals)
    return out


def barrier():
    if active():
        dist.barrier()


def close():
    """Leave the process group: every rank waits for the others, then gloo's threads are stopped. A process
    that exits with the group still open can abort in its C++ teardown ('terminate called without an
    active exception') after all its work is done."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
