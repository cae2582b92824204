"""The study's instrument: the gradient L2 norm of every LoRA matrix at every step, and its analysis.

(The design card calls this file profile.py. A top-level profile.py shadows the standard-library
module that cProfile imports, and torch then fails as soon as an optimiser is built, so it is
profiler.py; tests/test_profiler.py fails if any top-level module shadows the standard library.)

Recording: `GradientProfiler(model).record()` after the backward of a step (after all micro-batches,
so it sees the accumulated gradient) computes every ‖∇A‖ and ‖∇B‖ in one batched call on the device
(`torch._foreach_norm`) and copies them to the host once: one row [layers, modules, 2] per step.
Saved as run_dir/profile.safetensors (rundir.PROFILE): grad_norms [steps, layers, modules, 2], ranks and scales
[steps, layers, modules] (they change under dynamic allocation), plus profile_summary.json.

Analysis. The study names its statistics but does not define them; these are the project's choices
(DEFINITIONS, saved in every profile_summary.json), with the alternatives the report prints beside them:
  layer norm      the L2 norm of all the layer's LoRA gradients together (7 modules x {A, B}): sqrt of
                  the sum of the 14 squared matrix norms, not the sum of the norms (not printed), which
                  would weigh many small matrices like one large one
  share           a layer's mean norm over steps / the sum over layers, of norms; shares of squared
                  norms printed too (squaring roughly squares max/min: 2.17x becomes ~4.7x)
  top 30%         the share of the top 0.3·L layers, the fractional last layer counted by its fraction
                  (28 layers: 8.4; the top 8 and the top 9 are printed too). The choice matters: on a
                  profile spread linearly with the post's max/min of 2.17x it gives 38.1%, the top 8
                  36.4%, the top 9 40.5%; the post says ~36%
  early vs late   Pearson correlation of the shares over the first and the last third of the steps
                  (halves printed too)
  rank~shift      Pearson correlation, over layers, of a run's rank and its change of share against a
                  uniform run (the study's "amplification"; the random run is its control); "no shift"
                  when every change is below SHIFT_TOL (1e-4 percentage points), where a correlation
                  would only measure rounding noise
Every statistic is reported raw and rank-normalised: at initialisation ∇B = s·G(Ax)ᵀ, whose norm grows
like s·√r, so a raw norm partly measures the rank and the scale policy themselves (fixed alpha: r^-0.5,
alpha ∝ r: r^+0.5, rsLoRA: flat). The normalised view divides each matrix's norm by its module's s·√r
before combining. The tables name each run's scale policy, since the raw rank~shift sign depends on it.

Left out: per-token or per-sample gradients, and the gradients of the frozen weights (they have none).

    python profiler.py RUN_DIR [RUN_DIR ...] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import numpy as np
import torch

import rundir
from lora import TARGETS, layer_of, lora_modules

SHIFT_TOL = 1e-4  # percentage points: share changes all below this are rounding noise, not a shift
DEFINITIONS = {
    "layer_norm": "sqrt of the sum of the squared gradient norms of the layer's LoRA matrices (7 modules x A, B)",
    "share": "a layer's mean norm over steps / the sum over layers, in % (norms, not squared norms)",
    "max_min_ratio": "largest share / smallest share (max_min_ratio_squared: the same of squared-norm shares)",
    "top30_share": "share of the top 0.3*L layers, a fractional last layer counted by its fraction "
                   "(top30_share_floor / _ceil: the top floor(0.3*L) / ceil(0.3*L) layers)",
    "early_late_corr": "Pearson correlation of the shares over the first and the last third of the steps "
                       "(early_late_corr_halves: first and last half)",
    "normalised": "each matrix's norm divided by its module's s*sqrt(r) before combining",
}


class GradientProfiler:
    def __init__(self, model, num_layers: int | None = None, scale_policy: str | None = None):
        self.model, self.scale_policy = model, scale_policy  # the policy is written into the summary
        self.num_layers = num_layers or model.config.num_hidden_layers
        self.kinds = list(TARGETS)
        self.grad_norms: list[np.ndarray] = []  # one [L, M, 2] row per recorded step
        self.ranks: list[np.ndarray] = []
        self.scales: list[np.ndarray] = []
        # the adapters and their [layer, module] slots; a rank move changes r and scale, never the modules
        self.modules, slots = [], []
        for path, m in lora_modules(model).items():
            self.modules.append(m)
            slots.append(layer_of(path) * len(self.kinds) + self.kinds.index(path.rsplit(".", 1)[-1]))
        self.slots = np.array(slots, dtype=np.int64)

    @torch.no_grad()
    def record(self):
        """Append this step's ‖∇A‖, ‖∇B‖ of every adapter (a missing gradient counts as zero)."""
        grads = []
        for m in self.modules:
            for p in (m.lora_A.weight, m.lora_B.weight):
                grads.append(p.grad if p.grad is not None else torch.zeros_like(p))
        norms = torch.stack(torch._foreach_norm(grads)).float().view(-1, 2).cpu().numpy()  # one host copy
        shape = (self.num_layers, len(self.kinds))
        row = np.full((shape[0] * shape[1], 2), np.nan, np.float32)
        row[self.slots] = norms
        ranks, scales = np.zeros(shape[0] * shape[1], np.int32), np.zeros(shape[0] * shape[1], np.float32)
        ranks[self.slots] = [m.r for m in self.modules]  # the ranks and scales in force at this step
        scales[self.slots] = [m.scale for m in self.modules]
        self.grad_norms.append(row.reshape(*shape, 2))
        self.ranks.append(ranks.reshape(shape))
        self.scales.append(scales.reshape(shape))

    def __len__(self):
        return len(self.grad_norms)

    def arrays(self) -> dict:
        L, M = self.num_layers, len(self.kinds)
        stack = lambda rows, shape, dt: np.stack(rows) if rows else np.zeros((0, *shape), dt)
        return {"grad_norms": stack(self.grad_norms, (L, M, 2), np.float32),
                "ranks": stack(self.ranks, (L, M), np.int32), "scales": stack(self.scales, (L, M), np.float32)}

    def profile(self) -> "Profile":
        """The history so far, as the analysis functions take it."""
        return Profile(**self.arrays(), kinds=self.kinds)

    def save(self, run_dir: str):
        """profile.safetensors (the whole history, so a resumed run appends) and a summary, atomically."""
        from safetensors.numpy import save_file
        p = self.profile()
        meta = {"modules": json.dumps(self.kinds), "layers": str(self.num_layers)}
        tensors = {"grad_norms": p.grad_norms, "ranks": p.ranks, "scales": p.scales}
        rundir.atomic_write(os.path.join(run_dir, rundir.PROFILE), lambda tmp: save_file(tensors, tmp, metadata=meta))
        if len(self):
            rundir.atomic_json(os.path.join(run_dir, rundir.PROFILE_SUMMARY), summary(p, self.scale_policy))

    def load(self, run_dir: str):
        """Continue from a saved history (resume)."""
        p = load_profile(run_dir)
        self.grad_norms, self.ranks, self.scales = list(p.grad_norms), list(p.ranks), list(p.scales)

    def truncate(self, steps: int):
        del self.grad_norms[steps:], self.ranks[steps:], self.scales[steps:]


# -------------------------------------------------------------------------------------- analysis

class Profile:
    """A loaded profile: numpy arrays [steps, layers, modules(, 2)] and the module names."""

    def __init__(self, grad_norms, ranks, scales, kinds):
        self.grad_norms, self.ranks, self.scales, self.kinds = grad_norms, ranks, scales, kinds

    @property
    def layer_ranks(self) -> np.ndarray:
        """Each layer's rank at the last step (the mean over its adapted modules)."""
        r = self.ranks[-1].astype(float)
        return np.array([row[row > 0].mean() if (row > 0).any() else 0.0 for row in r])


def load_profile(run_dir: str) -> Profile:
    from safetensors import safe_open
    from safetensors.numpy import load_file
    path = os.path.join(run_dir, rundir.PROFILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no gradient profile in this run folder")
    try:
        with safe_open(path, framework="np") as f:
            kinds = json.loads(f.metadata()["modules"])
        a = load_file(path)
        return Profile(a["grad_norms"], a["ranks"], a["scales"], kinds)
    except Exception as e:  # safetensors' own errors, a missing key or metadata entry
        raise ValueError(f"{path}: not a gradient profile ({' '.join(str(e).split()) or type(e).__name__})") from None


def layer_norms(p: Profile, normalised: bool = False) -> np.ndarray:
    """[steps, layers]: the L2 norm of each layer's LoRA gradients (optionally each ÷ s·√r first)."""
    g = p.grad_norms.astype(np.float64)
    if normalised:
        norm = (p.scales * np.sqrt(np.maximum(p.ranks, 1)))[..., None]
        g = g / np.where(norm > 0, norm, np.nan)
    return np.sqrt(np.nansum(g ** 2, axis=(2, 3)))


def layer_shares(p: Profile, normalised: bool = False, steps: slice = slice(None), power: int = 1) -> np.ndarray:
    """Each layer's share (%) of the total gradient, from its mean norm (power=2: squared norm) over `steps`."""
    mean = (layer_norms(p, normalised)[steps] ** power).mean(0)
    if not mean.sum() > 0:  # no gradient at all in these steps (no reward signal): no share exists
        return np.full_like(mean, np.nan)
    return 100 * mean / mean.sum()


def steps_without_gradient(p: Profile) -> int:
    """Recorded steps whose every adapter gradient is zero: in GRPO, steps where every group's rewards
    tied (all advantages 0) and no KL term pulled."""
    return int((np.nansum(p.grad_norms, axis=(1, 2, 3)) == 0).sum())


def top_share(shares: np.ndarray, fraction: float = 0.3, rounding: str = "interpolate") -> float:
    """Share (%) carried by the top `fraction` of layers: a fractional last layer counted by its fraction
    ("interpolate"), or the top floor/ceil(fraction·L) layers whole ("floor", "ceil")."""
    s = np.sort(shares)[::-1]
    k = fraction * len(s)
    if rounding != "interpolate":
        return float(s[:int(math.floor(k) if rounding == "floor" else math.ceil(k))].sum())
    whole = int(math.floor(k))
    return float(s[:whole].sum() + (k - whole) * (s[whole] if whole < len(s) else 0.0))


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def early_late(p: Profile, normalised: bool = False, part: int = 3) -> float:
    """Correlation of the per-layer shares over the first and the last 1/part of the steps."""
    n = len(p.grad_norms)
    w = max(1, n // part)
    return pearson(layer_shares(p, normalised, slice(0, w)), layer_shares(p, normalised, slice(n - w, n)))


def flatness(p: Profile, normalised: bool = False) -> dict:
    """The study's statistics for one run (see DEFINITIONS), with the alternatives beside them;
    {"no_signal": True, ...} alone when the profile holds no gradient at all (every share would be 0/0).
    A correlation that cannot be computed (a third of the steps without gradient) is None."""
    s = layer_shares(p, normalised)
    if np.isnan(s).any():
        return {"no_signal": True, "steps": len(p.grad_norms), "steps_without_gradient": steps_without_gradient(p)}
    sq = layer_shares(p, normalised, power=2)
    corr = lambda x: None if math.isnan(x) else x
    return {"hottest_layer": int(s.argmax()), "hottest_share": float(s.max()), "coldest_layer": int(s.argmin()),
            "coldest_share": float(s.min()), "max_min_ratio": float(s.max() / s.min()),
            "max_min_ratio_squared": float(sq.max() / sq.min()),
            "top30_share": top_share(s, 0.3), "top30_share_floor": top_share(s, 0.3, "floor"),
            "top30_share_ceil": top_share(s, 0.3, "ceil"),
            "early_late_corr": corr(early_late(p, normalised)),
            "early_late_corr_halves": corr(early_late(p, normalised, 2)),
            "steps": len(p.grad_norms), "steps_without_gradient": steps_without_gradient(p),
            "shares": [float(x) for x in s]}


def amplification(base: Profile, other: Profile, normalised: bool = False) -> float:
    """Correlation between a run's allocated rank and its change of gradient share vs the base run;
    NaN ("no shift") when no share moved by SHIFT_TOL, where a correlation would be of rounding noise."""
    shift = layer_shares(other, normalised) - layer_shares(base, normalised)
    if np.abs(shift).max() < SHIFT_TOL:
        return float("nan")
    return pearson(other.layer_ranks, shift)


def summary(p: Profile, scale_policy: str | None = None) -> dict:
    return {"raw": flatness(p), "normalised": flatness(p, True), "layer_ranks": p.layer_ranks.tolist(),
            "modules": p.kinds, "scale_policy": scale_policy, "definitions": DEFINITIONS}


# ------------------------------------------------------------------------------------------- report

def run_config(run_dir: str) -> dict:
    """The run's config.json ({} when there is none, e.g. a bare profile folder)."""
    path = os.path.join(run_dir, rundir.CONFIG)
    return rundir.read_json(path) if os.path.isfile(path) else {}


def run_label(run_dir: str) -> str:
    """The run folder's name (with its parent's for a --seeds run, seed<N>): three uniform runs must be told apart."""
    parts = os.path.normpath(run_dir).split(os.sep)
    return "/".join(parts[-2:]) if re.fullmatch(r"seed\d+", parts[-1]) and len(parts) > 1 else parts[-1]


def fmt_amp(x: float) -> str:
    return "no shift" if math.isnan(x) else f"{x:.3f}"


def fmt_corr(x: float | None) -> str:
    return "no signal" if x is None else f"{x:.3f}"


def report(run_dirs: list[str]) -> str:
    """The flatness statistics of each run, raw and rank-normalised, amplification vs a uniform run, and
    the same statistics under the alternative definitions."""
    profiles = [load_profile(d) for d in run_dirs]
    labels = [run_label(d) for d in run_dirs]
    configs = [run_config(d) for d in run_dirs]
    w = max(22, *(len(x) for x in labels))
    lines = [f"{'run':<{w}} {'algo':<4} {'policy':<8} {'view':<4} {'steps':>5} {'hot(L)':>9} {'cold(L)':>9} "
             f"{'max/min':>7} {'top30%':>6} {'early~late':>10} {'rank~shift':>10}"]
    uniform = [i for i, p in enumerate(profiles) if np.ptp(p.layer_ranks) == 0]
    base = profiles[uniform[0]] if uniform else None
    alternatives = []
    for label, p, c in zip(labels, profiles, configs):
        policy = c.get("scale_policy", "?")
        for view, norm in (("raw", False), ("norm", True)):
            f = flatness(p, norm)
            if f.get("no_signal"):
                lines.append(f"{label:<{w}} {c.get('algo', '?'):<4} {policy:<8} {view:<4} {f['steps']:>5} "
                             f"no signal: every recorded step's gradient is zero")
                continue
            amp = "" if base is None or np.ptp(p.layer_ranks) == 0 else \
                "no signal" if flatness(base, norm).get("no_signal") else fmt_amp(amplification(base, p, norm))
            lines.append(f"{label:<{w}} {c.get('algo', '?'):<4} {policy:<8} {view:<4} {f['steps']:>5} "
                         f"{f['hottest_share']:>5.2f}({f['hottest_layer']:>2}) {f['coldest_share']:>5.2f}"
                         f"({f['coldest_layer']:>2}) {f['max_min_ratio']:>7.2f} {f['top30_share']:>6.1f} "
                         f"{fmt_corr(f['early_late_corr']):>10} {amp:>10}")
            alternatives.append(f"{label:<{w}} {view:<4} {f['max_min_ratio_squared']:>11.2f} "
                                f"{f['top30_share_floor']:>7.1f} {f['top30_share_ceil']:>7.1f} "
                                f"{fmt_corr(f['early_late_corr_halves']):>11}")
    if base is None and len(profiles) > 1:
        lines.append("(no run with uniform ranks among these: rank~shift needs one as the baseline)")
    k = 0.3 * profiles[0].grad_norms.shape[1]
    lines += ["", "The same under other definitions (the study does not define them; see profiler.py):",
              f"{'run':<{w}} {'view':<4} {'max/min sq':>11} {f'top {math.floor(k)}':>7} {f'top {math.ceil(k)}':>7} "
              f"{'early~late½':>11}", *alternatives]
    return "\n".join(lines)


def plot(run_dirs: list[str], path: str) -> bool:
    """Per-layer gradient share of each run (raw and normalised) with its ranks; False without matplotlib.

    Layers are categories, not a continuum: markers, no lines between layers, integer ticks. Runs are
    offset sideways a little so that equal values stay visible; the rank history's x axis is the step
    number the log prints (step 1 is the first optimiser step).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    profiles = [(load_profile(d), run_label(d)) for d in run_dirs]
    moving = [(p, label) for p, label in profiles if (p.ranks != p.ranks[:1]).any()]  # dynamic runs
    fig, axes = plt.subplots(3 + len(moving), 1, figsize=(10, 9 + 3 * len(moving)))
    width = 0.6 / max(1, len(profiles))
    for i, (p, label) in enumerate(profiles):
        x = np.arange(p.grad_norms.shape[1]) + (i - (len(profiles) - 1) / 2) * width
        axes[0].plot(x, layer_shares(p), "o", label=label)
        axes[1].plot(x, layer_shares(p, True), "o", label=label)
        axes[2].bar(x, p.layer_ranks, width=width, label=label)
    titles = ["gradient share per layer, raw (%)", "gradient share per layer, rank-normalised: each norm ÷ s·√r (%)",
              "rank per layer at the last step"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[1].set_ylabel("%")
    axes[2].set_ylabel("rank")
    for ax in axes[:3]:
        ax.legend(fontsize=8)
    for ax, (p, label) in zip(axes[3:], moving):  # rank history: layers x steps
        layer_rank = np.where(p.ranks > 0, p.ranks, np.nan).astype(float)
        steps, layers = layer_rank.shape[:2]
        im = ax.imshow(np.nanmean(layer_rank, axis=2).T, aspect="auto", origin="lower", interpolation="nearest",
                       extent=(0.5, steps + 0.5, -0.5, layers - 0.5))  # column j is step j + 1, as logged
        ax.set_title(f"{label}: rank of each layer during each step (a move logged at step s applies from s + 1)")
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description="Gradient-profile statistics of one or more runs.")
    ap.add_argument("runs", nargs="+", help="run folders holding profile.safetensors")
    ap.add_argument("--plot", help="write the per-layer share figure to this PNG (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.plot and not os.path.isdir(folder := os.path.dirname(os.path.abspath(args.plot))):
        sys.exit(f"error: --plot {args.plot}: folder {folder} does not exist")
    try:
        print(report(args.runs))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.plot:
        print(f"figure: {args.plot}" if plot(args.runs, args.plot) else "matplotlib not installed: no figure")


if __name__ == "__main__":
    main()
