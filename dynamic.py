"""Dynamic rank reallocation during training: the study's open question, tested.

The study concludes that static profile-then-reallocate fails under GRPO because rank itself moves
the gradient, and that adaptive rank "probably has to be dynamic, adjusting continuously during
training, AdaLoRA-style" (Zhang et al., arXiv 2303.10512). `--strategy dynamic` does that:

  schedule    no moves before `t_init` (the profile first has to say something) nor after `t_final`
              (the last allocation gets time to be used); between them, one move every `every` steps.
  importance  each layer's mean gradient norm over the last `window` profiled steps, by default
              rank-normalised (each matrix's norm ÷ s·√r, see profiler.py): a raw norm partly measures
              the rank already given, which would make the allocation chase its own tail.
  allocation  allocate.proportional on that importance: same total budget, within [r_min, r_max].
  the move    LoRALinear.set_rank: adapters live in buffers of capacity r_max, so shapes never change
              and the optimiser keeps its parameters; s·B·A is re-factored by an SVD, so growing keeps
              the output exactly and shrinking keeps the most significant directions. A keeps its
              initial row scale and B absorbs the rest, so a layer's gradient norm (the next importance
              estimate) changes only by the scale policy's s·√r, not by the move; new directions start
              as fresh LoRA directions, and the scale is the policy's for the new rank. The AdamW moments
              of a moved module are reset, since they belonged to the old factorisation.

AdaLoRA's own P·Λ·Q parametrisation with an orthogonality penalty and sensitivity-based importance is
not reproduced; this is the smallest dynamic scheme that keeps the study's budget and profiler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import allocate
import lora
from profiler import layer_norms


@dataclass
class DynamicConfig:
    every: int = 50
    t_init: int = 100
    t_final: int = 800
    window: int = 50
    normalised: bool = True


def should_move(step: int, cfg: DynamicConfig) -> bool:
    """After `step` optimiser steps: is this a reallocation point?"""
    return cfg.t_init <= step <= cfg.t_final and (step - cfg.t_init) % cfg.every == 0


def reallocate(model, profiler, optimizer, *, budget: int, bounds: tuple[int, int], scale_of: Callable[[int], float],
               cfg: DynamicConfig) -> list[int]:
    """Move rank between layers from the recent profile; returns the new per-layer ranks.

    `scale_of(r)` is the scale policy's multiplier for rank r (lora.lora_scale with the run's alpha)."""
    importance = layer_norms(profiler.profile(), cfg.normalised)[-cfg.window:].mean(0)
    ranks = allocate.proportional(importance, budget, *bounds)
    apply_layer_ranks(model, ranks, scale_of, optimizer)
    return ranks


def no_signal(profiler, cfg: DynamicConfig, budget: int, bounds: tuple[int, int]) -> str | None:
    """Why the recent profile cannot drive a move (None when it can): layers without any gradient in
    the window (no reward signal reached them) would be pinned at r_min and the budget may not fit."""
    importance = layer_norms(profiler.profile(), cfg.normalised)[-cfg.window:].mean(0)
    dead = int((importance == 0).sum())
    if dead == len(importance):
        return f"no gradient in the last {cfg.window} profiled steps (every group's rewards tied: no reward signal)"
    if dead and budget > (len(importance) - dead) * bounds[1] + dead * bounds[0]:
        return f"{dead} of {len(importance)} layers had no gradient in the last {cfg.window} profiled steps"
    return None


def apply_layer_ranks(model, layer_ranks: list[int], scale_of: Callable[[int], float], optimizer=None):
    """Give every adapter of layer i rank layer_ranks[i], with the scale `scale_of` gives that rank."""
    for path, m in lora.lora_modules(model).items():
        r = layer_ranks[lora.layer_of(path)]
        if r == m.r:
            continue
        m.set_rank(r, scale_of(r))
        if optimizer is not None:
            for p in (m.lora_A.weight, m.lora_B.weight):
                optimizer.state.pop(p, None)  # AdamW starts this parameter's moments afresh


def layer_ranks(model) -> list[int]:
    """The current rank of each layer (its modules share it)."""
    out = {}
    for path, m in lora.lora_modules(model).items():
        out[lora.layer_of(path)] = m.r
    return [out[i] for i in sorted(out)]
