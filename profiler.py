"""The study's instrument: the gradient L2 norm of every LoRA matrix at every step, and its analysis.

(The design card calls this file profile.py. A top-level profile.py shadows the standard-library
module that cProfile imports, and torch then fails as soon as an optimiser is built, so it is
profiler.py; tests/test_profiler.py fails if any top-level module shadows the standard library.)

Recording: `GradientProfiler(model).record()` after the backward of a step (after all micro-batches,
so it sees the accumulated gradient) computes every ‖∇A‖ and ‖∇B‖ in one batched call on the device
(`torch._foreach_norm`) and copies them to the host once: one row [layers, modules, 2] per step.
Saved as run_dir/profile.safetensors: grad_norms [steps, layers, modules, 2], ranks and scales
[steps, layers, modules] (they change under dynamic allocation), plus profile_summary.json.

Analysis. A layer's gradient at a step is the L2 norm of all its LoRA gradients together; its share
is its mean over steps divided by the sum over layers. Every statistic is reported raw and
rank-normalised: at initialisation ∇B = s·G(Ax)ᵀ, whose norm grows like s·√r, so a raw norm partly
measures the rank and the scale policy themselves (fixed alpha: r^-0.5, alpha ∝ r: r^+0.5, rsLoRA:
flat). The normalised view divides each matrix's norm by its module's s·√r before combining.

    python profiler.py RUN_DIR [RUN_DIR ...] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

from lora import TARGETS, layer_of, lora_modules

PROFILE_FILE, SUMMARY_FILE = "profile.safetensors", "profile_summary.json"


class GradientProfiler:
    def __init__(self, model, num_layers: int | None = None):
        self.model = model
        self.num_layers = num_layers or model.config.num_hidden_layers
        self.kinds = list(TARGETS)
        self.grad_norms: list[np.ndarray] = []  # one [L, M, 2] row per recorded step
        self.ranks: list[np.ndarray] = []
        self.scales: list[np.ndarray] = []
        self.refresh()

    def refresh(self):
        """Re-read the adapters (after apply_lora, or after a dynamic rank move)."""
        self.modules, slots = [], []
        M = len(self.kinds)
        for path, m in lora_modules(self.model).items():
            layer, kind = layer_of(path), path.rsplit(".", 1)[-1]
            self.modules.append(m)
            slots.append(layer * M + self.kinds.index(kind))
        self.slots = torch.tensor(slots, dtype=torch.long)
        L = self.num_layers
        self.rank_now = np.zeros((L, M), np.int32)
        self.scale_now = np.zeros((L, M), np.float32)
        for m, slot in zip(self.modules, slots):
            self.rank_now.flat[slot], self.scale_now.flat[slot] = m.r, m.scale

    @torch.no_grad()
    def record(self):
        """Append this step's ‖∇A‖, ‖∇B‖ of every adapter (a missing gradient counts as zero)."""
        grads = []
        for m in self.modules:
            for p in (m.lora_A.weight, m.lora_B.weight):
                grads.append(p.grad if p.grad is not None else torch.zeros_like(p))
        norms = torch.stack(torch._foreach_norm(grads)).float().view(-1, 2).cpu().numpy()  # one host copy
        row = np.full((self.num_layers * len(self.kinds), 2), np.nan, np.float32)
        row[self.slots.numpy()] = norms
        self.grad_norms.append(row.reshape(self.num_layers, len(self.kinds), 2))
        self.ranks.append(self.rank_now.copy())
        self.scales.append(self.scale_now.copy())

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
        tmp = os.path.join(run_dir, PROFILE_FILE + ".tmp")
        save_file({"grad_norms": p.grad_norms, "ranks": p.ranks, "scales": p.scales}, tmp, metadata=meta)
        os.replace(tmp, os.path.join(run_dir, PROFILE_FILE))
        if len(self):
            atomic_json(os.path.join(run_dir, SUMMARY_FILE), summary(p))

    def load(self, run_dir: str):
        """Continue from a saved history (resume)."""
        p = load_profile(run_dir)
        self.grad_norms, self.ranks, self.scales = list(p.grad_norms), list(p.ranks), list(p.scales)

    def truncate(self, steps: int):
        del self.grad_norms[steps:], self.ranks[steps:], self.scales[steps:]


def atomic_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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
    path = os.path.join(run_dir, PROFILE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no gradient profile in this run folder")
    with safe_open(path, framework="np") as f:
        kinds = json.loads(f.metadata()["modules"])
    a = load_file(path)
    return Profile(a["grad_norms"], a["ranks"], a["scales"], kinds)


def layer_norms(p: Profile, normalised: bool = False) -> np.ndarray:
    """[steps, layers]: the L2 norm of each layer's LoRA gradients (optionally each ÷ s·√r first)."""
    g = p.grad_norms.astype(np.float64)
    if normalised:
        norm = (p.scales * np.sqrt(np.maximum(p.ranks, 1)))[..., None]
        g = g / np.where(norm > 0, norm, np.nan)
    return np.sqrt(np.nansum(g ** 2, axis=(2, 3)))


def layer_shares(p: Profile, normalised: bool = False, steps: slice = slice(None)) -> np.ndarray:
    """Each layer's share (%) of the total gradient, from its mean norm over `steps`."""
    mean = layer_norms(p, normalised)[steps].mean(0)
    return 100 * mean / mean.sum()


def top_share(shares: np.ndarray, fraction: float = 0.3) -> float:
    """Share (%) carried by the top `fraction` of layers, interpolating a fractional last layer."""
    s = np.sort(shares)[::-1]
    k = fraction * len(s)
    whole = int(math.floor(k))
    return float(s[:whole].sum() + (k - whole) * (s[whole] if whole < len(s) else 0.0))


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def flatness(p: Profile, normalised: bool = False) -> dict:
    """The study's statistics for one run."""
    s = layer_shares(p, normalised)
    n = len(p.grad_norms)
    third = max(1, n // 3)
    early, late = layer_shares(p, normalised, slice(0, third)), layer_shares(p, normalised, slice(n - third, n))
    return {"hottest_layer": int(s.argmax()), "hottest_share": float(s.max()), "coldest_layer": int(s.argmin()),
            "coldest_share": float(s.min()), "max_min_ratio": float(s.max() / s.min()),
            "top30_share": top_share(s, 0.3), "early_late_corr": pearson(early, late), "steps": n,
            "shares": [float(x) for x in s]}


def amplification(base: Profile, other: Profile, normalised: bool = False) -> float:
    """Correlation between a run's allocated rank and its change of gradient share vs the base run."""
    shift = layer_shares(other, normalised) - layer_shares(base, normalised)
    return pearson(other.layer_ranks, shift)


def summary(p: Profile) -> dict:
    return {"raw": flatness(p), "normalised": flatness(p, True), "layer_ranks": p.layer_ranks.tolist(),
            "modules": p.kinds}


# ------------------------------------------------------------------------------------------- report

def run_label(run_dir: str) -> str:
    cfg = os.path.join(run_dir, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            c = json.load(f)
        return f"{c.get('algo', 'grpo')}:{c.get('strategy', '?')}"
    return os.path.basename(os.path.normpath(run_dir))


def report(run_dirs: list[str]) -> str:
    """The flatness statistics of each run, raw and rank-normalised, and amplification vs a uniform run."""
    profiles = [load_profile(d) for d in run_dirs]
    labels = [run_label(d) for d in run_dirs]
    lines = [f"{'run':<22} {'view':<5} {'steps':>5} {'hot(L)':>8} {'cold(L)':>8} {'max/min':>7} {'top30%':>6} "
             f"{'early~late':>10} {'rank~shift':>10}"]
    uniform = [i for i, p in enumerate(profiles) if np.ptp(p.layer_ranks) == 0]
    base = profiles[uniform[0]] if uniform else None
    for label, p in zip(labels, profiles):
        for view, norm in (("raw", False), ("norm", True)):
            f = flatness(p, norm)
            amp = "" if base is None or p is base else f"{amplification(base, p, norm):10.3f}"
            lines.append(f"{label:<22} {view:<5} {f['steps']:>5} {f['hottest_share']:>5.2f}({f['hottest_layer']:>2})"
                         f"{f['coldest_share']:>6.2f}({f['coldest_layer']:>2}) {f['max_min_ratio']:>7.2f} "
                         f"{f['top30_share']:>6.1f} {f['early_late_corr']:>10.3f} {amp:>10}")
    if base is None and len(profiles) > 1:
        lines.append("(no run with uniform ranks among these: rank~shift needs one as the baseline)")
    return "\n".join(lines)


def plot(run_dirs: list[str], path: str) -> bool:
    """Per-layer gradient share of each run (raw and normalised) with its ranks; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    profiles = [(load_profile(d), run_label(d)) for d in run_dirs]
    moving = [(p, label) for p, label in profiles if (p.ranks != p.ranks[:1]).any()]  # dynamic runs
    fig, axes = plt.subplots(3 + len(moving), 1, figsize=(10, 9 + 3 * len(moving)))
    for p, label in profiles:
        x = np.arange(p.grad_norms.shape[1])
        axes[0].plot(x, layer_shares(p), marker="o", label=label)
        axes[1].plot(x, layer_shares(p, True), marker="o", label=label)
        axes[2].step(x, p.layer_ranks, where="mid", label=label)
    for ax, title in zip(axes, ["gradient share % (raw)", "gradient share % (÷ s·√r)", "final rank"]):
        ax.set_ylabel(title)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend()
    for ax, (p, label) in zip(axes[3:], moving):  # rank history: layers x steps
        layer_rank = np.where(p.ranks > 0, p.ranks, np.nan).astype(float)
        im = ax.imshow(np.nanmean(layer_rank, axis=2).T, aspect="auto", origin="lower", interpolation="nearest")
        ax.set_title(f"{label}: rank of each layer over training")
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description="Gradient-profile statistics of one or more runs.")
    ap.add_argument("runs", nargs="+", help="run folders holding profile.safetensors")
    ap.add_argument("--plot", help="write the per-layer share figure to this PNG (needs matplotlib)")
    args = ap.parse_args(argv)
    try:
        print(report(args.runs))
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if args.plot:
        print(f"figure: {args.plot}" if plot(args.runs, args.plot) else "matplotlib not installed: no figure")


if __name__ == "__main__":
    main()
