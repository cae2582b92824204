"""The study's intervention: turn a rank budget (and a gradient profile) into per-layer LoRA ranks.

Pure numbers in, integers out; the budget is the sum of per-layer ranks (896 = 28 x 32 for
Qwen2.5-1.5B) and every module of a layer gets the layer's rank, as in the study (per-module units
are an option: pass one weight per module and a budget over modules).

  uniform       budget / layers everywhere (the budget must divide evenly)
  proportional  rank ∝ the layer's gradient share, clamped to [r_min, r_max]; the clamped layers are
                fixed and the rest re-scaled until all fit (water-filling), then rounded by largest
                remainder, so the total is exactly the budget
  random        uniform in [r_min, r_max] (seeded), then nudged one unit at a time to the budget
  reduced       proportional with `fraction` (70%) of the budget

Default bounds are fractions of the uniform rank that give the study's ranges at its budget:
proportional 20-40, random 16-48, reduced 12-32 (the study reports 12-31 for reduced). Impossible
requests are errors, never silently clipped.

Left out: moving rank during training (dynamic.py), and allocation below the layer (every module of
a layer gets the layer's rank, as in the study).

    python allocate.py --strategy proportional --profile RUN_DIR [--out ranks.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import rundir

STRATEGIES = ("uniform", "proportional", "random", "reduced")
# Bounds as fractions of the uniform rank (budget / units): at 896 / 28 = 32 they are the study's
# 20-40, 16-48 and 12-32; a smaller model or budget scales them with it.
BOUNDS = {"uniform": (0, 10**6), "proportional": (0.625, 1.25), "random": (0.5, 1.5), "reduced": (0.375, 1.0)}
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _check(n: int, budget: int, lo: int, hi: int):
    if not 0 <= lo <= hi:
        raise ValueError(f"bounds must satisfy 0 <= r_min <= r_max, got [{lo}, {hi}]")
    if not n * lo <= budget <= n * hi:
        raise ValueError(f"budget {budget} cannot be split over {n} units within [{lo}, {hi}]: it must lie in "
                         f"[{n * lo}, {n * hi}]")


def proportional(weights, budget: int, lo: int, hi: int) -> list[int]:
    """Integer ranks ∝ weights, each in [lo, hi], summing exactly to budget."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("profile weights must be finite and non-negative")
    _check(len(w), budget, lo, hi)
    reachable = np.where(w > 0, hi, lo).sum()  # units with zero weight stay at r_min
    if budget > reachable:
        raise ValueError(f"budget {budget} unreachable: {int((w == 0).sum())} unit(s) with zero gradient share "
                         f"stay at r_min, the rest top out at r_max (at most {reachable})")
    # Real-valued water-filling: find c with sum(clip(c·w, lo, hi)) = budget; f(c) is monotone, so bisect.
    f = lambda c: np.clip(c * w, lo, hi).sum()
    c_lo, c_hi = 0.0, 1.0
    while f(c_hi) < budget:
        c_hi *= 2
    for _ in range(200):
        mid = (c_lo + c_hi) / 2
        c_lo, c_hi = (mid, c_hi) if f(mid) < budget else (c_lo, mid)
    x = np.clip(c_hi * w, lo, hi)
    x *= budget / x.sum() if x.sum() > 0 else 1.0  # remove the bisection's last rounding error
    x = np.clip(x, lo, hi)
    ranks = np.floor(x + 1e-9).astype(int)
    left = budget - ranks.sum()
    remainder = x - ranks
    order = np.argsort(-remainder if left > 0 else remainder, kind="stable")  # largest remainder first
    for i in order:
        if left == 0:
            break
        step = int(np.sign(left))
        if lo <= ranks[i] + step <= hi:
            ranks[i] += step
            left -= step
    assert ranks.sum() == budget and ranks.min() >= lo and ranks.max() <= hi
    return [int(r) for r in ranks]


def random_ranks(n: int, budget: int, lo: int, hi: int, seed: int) -> list[int]:
    """Seeded uniform ranks in [lo, hi], moved one unit at a time (random unit) to sum to budget."""
    _check(n, budget, lo, hi)
    rng = np.random.default_rng(seed)
    r = rng.integers(lo, hi + 1, size=n)
    while (diff := budget - r.sum()) != 0:
        step = 1 if diff > 0 else -1
        room = np.flatnonzero((r + step >= lo) & (r + step <= hi))
        r[rng.choice(room)] += step
    return [int(x) for x in r]


def bounds(strategy: str, num_layers: int, budget: int, r_min: int | None = None,
           r_max: int | None = None) -> tuple[int, int]:
    """[r_min, r_max] for a strategy: the given values, else its fractions of the uniform rank."""
    r0 = budget / num_layers
    lo = round(BOUNDS[strategy][0] * r0) if r_min is None else r_min
    hi = round(BOUNDS[strategy][1] * r0) if r_max is None else r_max
    return lo, hi


def allocate(strategy: str, num_layers: int, budget: int, profile=None, r_min: int | None = None,
             r_max: int | None = None, seed: int = 0, fraction: float = 0.7) -> list[int]:
    """Ranks per unit (layer, or module) for a strategy; `profile` is one weight per unit (gradient shares)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} unknown; allowed: {STRATEGIES}")
    lo, hi = bounds(strategy, num_layers, budget, r_min, r_max)
    if strategy == "uniform":
        if budget % num_layers:
            raise ValueError(f"uniform: budget {budget} is not a multiple of {num_layers} units")
        return [budget // num_layers] * num_layers
    if strategy == "random":
        return random_ranks(num_layers, budget, lo, hi, seed)
    if profile is None:
        raise ValueError(f"{strategy} needs a gradient profile (per-layer shares of a uniform run)")
    if len(profile) != num_layers:
        raise ValueError(f"profile has {len(profile)} entries, expected {num_layers}")
    if strategy == "reduced":
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        budget = int(round(fraction * budget))
    return proportional(profile, budget, lo, hi)


def rank_pattern(ranks: list[int], modules=MODULES, per_module: bool = False) -> dict[str, int]:
    """{exact module path: rank} for lora.apply_lora (ranks per layer, or per layer x module)."""
    if per_module:
        if len(ranks) % len(modules):
            raise ValueError(f"{len(ranks)} per-module ranks do not split into layers of {len(modules)} modules")
        return {f"model.layers.{i // len(modules)}.{modules[i % len(modules)]}": int(r) for i, r in enumerate(ranks)}
    return {f"model.layers.{layer}.{m}": int(r) for layer, r in enumerate(ranks) for m in modules}


def read_shares(run_dir: str, normalised: bool = False) -> list[float]:
    """Per-layer gradient shares from a run's profile_summary.json (written by profiler.py)."""
    path = os.path.join(run_dir, rundir.PROFILE_SUMMARY)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no gradient profile summary (run a uniform arm first: "
                                f"python train.py --strategy uniform)")
    summary = rundir.read_json(path)
    if isinstance(summary, dict) and isinstance(summary.get("raw"), dict) and summary["raw"].get("no_signal"):
        raise ValueError(f"{path}: the profile carries no gradient: in all {summary['raw'].get('steps')} steps every "
                         f"group's rewards tied, so every advantage was 0 (no reward signal); there is nothing to "
                         f"allocate from (check the rewards: metrics.jsonl's no_signal and zero_std_groups)")
    try:
        shares = summary["normalised" if normalised else "raw"]["shares"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a profile summary ({type(e).__name__}: {e})") from None
    if not (isinstance(shares, list) and shares and all(isinstance(x, (int, float)) for x in shares)):
        raise ValueError(f"{path}: its shares are not a list of numbers")
    return shares


def table(ranks: list[int]) -> str:
    return "\n".join(f"layer {i:>3}: {r:>4} {'#' * int(r // 2)}" for i, r in enumerate(ranks)) + \
        f"\ntotal {sum(ranks)}, range {min(ranks)}-{max(ranks)}"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Per-layer LoRA ranks for a strategy and a rank budget.")
    ap.add_argument("--strategy", required=True, choices=STRATEGIES)
    ap.add_argument("--profile", help="run folder of a finished uniform run (proportional, reduced)")
    ap.add_argument("--num-layers", type=int, default=28)
    ap.add_argument("--budget", type=int, help="sum of per-layer ranks (default: layers x 32)")
    ap.add_argument("--r-min", type=int)
    ap.add_argument("--r-max", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=0.7, help="budget fraction for reduced")
    ap.add_argument("--normalised", action="store_true", help="use rank-normalised gradient shares")
    ap.add_argument("--out", help="write {module path: rank} JSON here")
    args = ap.parse_args(argv)
    try:
        shares = read_shares(args.profile, args.normalised) if args.profile else None
        n = len(shares) if shares else args.num_layers
        ranks = allocate(args.strategy, n, args.budget or 32 * n, shares, args.r_min, args.r_max, args.seed,
                         args.fraction)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(table(ranks))
    if args.out:
        rundir.atomic_json(args.out, rank_pattern(ranks))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
