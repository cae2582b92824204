"""A run's resumable state in one file: the adapters with their ranks, the optimiser, the schedule,
every random generator and the step, written atomically and read back as data only.

Written every --checkpoint-every steps (default 50) and on Ctrl-C, by temporary file and rename, so a
crash while one is written leaves the previous one intact (tested). Each adapter's rank and scale are
part of its state_dict, so a dynamic run's moved ranks come back with load_state_dict. A checkpoint is
loaded with torch.load(weights_only=True): tensors, lists and plain values, never a pickled object, so
a checkpoint someone sent cannot run code here. Anything else (a pickle, a truncated file, a
checkpoint of another model) is a one-line error naming the file.

Resuming (`python train.py --resume RUN_DIR`) continues where the run stopped; on the CPU the result
is bit-identical to an uninterrupted run (tested, with dropout too). train.py reconciles every file
with the checkpoint: metrics lines and profile rows past its step are recomputed; without a
checkpoint (a crash before the first one) the run starts again at step 0 and says how many logged
steps it discards; a metrics.jsonl or profile that holds fewer steps than the checkpoint has lost
steps, and the resume is refused with what is missing. Flags given with --resume that may change
(config.RESUMABLE: --steps, --stop-after, --checkpoint-every, --threads, --eval-batch, --compile,
--device) are applied and saved, any other is refused by name; a finished run says it is finished
(--steps N trains it further). A start that fails (a bad flag, a missing model or data file) fails
before anything is written, or removes the folder it created. Ctrl-C finishes the current step,
writes a checkpoint and exits (a second Ctrl-C exits at once, in one line); --stop-after N stops
cleanly after N steps, for time-limited jobs.

Left out: the frozen base weights (the model folder has them), the gradient profile and the metrics
(their own files in the run folder, which train.py checks against the checkpoint's step on resume).
"""

from __future__ import annotations

import random

import numpy as np
import torch

import lora
from rundir import atomic_write

KEYS = {"step", "lora", "optimizer", "scheduler", "rng"}


def save(path: str, step: int, model, optimizer, scheduler, device: torch.device):
    state = {"step": step, "lora": lora.adapter_state(model), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng_state(device)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load(path: str, model, optimizer, scheduler, device: torch.device) -> int:
    """Restore adapters (A, B and each one's rank and scale), optimiser, schedule and every RNG;
    returns the step. Raises ValueError naming the file when it is not a checkpoint of this model."""
    try:  # data only: a checkpoint someone sent cannot run code here
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a pickled object, a truncated or garbage file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a checkpoint this program can load ({reason}); checkpoints are read as "
                         f"tensors and plain values only") from None
    if not isinstance(state, dict) or set(state) != KEYS:
        raise ValueError(f"{path}: not a checkpoint this program wrote (unexpected contents)")
    unexpected = model.load_state_dict(state["lora"], strict=False).unexpected_keys
    missing = sorted(set(lora.adapter_state(model)) - set(state["lora"]))
    if unexpected or missing:
        raise ValueError(f"{path}: does not fit the model (unexpected {unexpected[:3]}, missing {missing[:3]})")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"]


def step_of(path: str) -> int | None:
    """The step a checkpoint holds, read without loading its tensors into memory; None when there is no
    readable checkpoint (load() then says why)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        return None


def rng_state(device: torch.device) -> dict:
    """Every RNG's state as tensors and plain values, so a checkpoint loads with weights_only=True."""
    np_state = np.random.get_state(legacy=False)  # {'bit_generator', 'state': {'key', 'pos'}, 'has_gauss', 'gauss'}
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "numpy": np_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_state(rng: dict):
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(rng["numpy"], state=dict(rng["numpy"]["state"]))
    np_state["state"]["key"] = np_state["state"]["key"].cpu().numpy().astype(np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
