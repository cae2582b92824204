"""The study's report, from its run folders alone: tables, figures and a markdown summary.

    python study_report.py study/            # writes study/REPORT.md, study/summary.json, study/*.png

It reads what train.py wrote in <study>/<arm>/seed<N> (results.json, eval_final.jsonl, metrics.jsonl,
profile.safetensors, config.json) and reports, for each of the study's claims:
  accuracy        each arm's mean and spread over seeds, each run's Wilson interval, and a paired test
                  of the arm against uniform on the same problems: per seed (McNemar's exact test on
                  the problems exactly one run solved) and pooled over seeds (the discordant counts
                  summed; the seeds' problem sets are the same, so this pools seeds, not problems).
  flatness        max/min share, top-30% share and early-vs-late correlation of GRPO and SFT runs,
                  raw and rank-normalised (profiler.py's definitions).
  amplification   the correlation over layers of rank and change of gradient share against the
                  uniform run of the same seed and scale policy, raw and rank-normalised, per policy.
Figures need matplotlib (requirements-dev.txt); without it the report says so and keeps the tables.

Left out: running anything (study.py), and significance corrections across the many comparisons.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys

import numpy as np

import profiler as P
import report
import rundir

ARMS = ["base", "uniform", "proportional", "reduced", "random", "dynamic", "sft-uniform", "uniform-rslora",
        "random-constant", "random-rslora"]
# amplification: (arm with moved rank, the uniform arm of the same scale policy, the policy)
AMPLIFICATION = [("proportional", "uniform", "fixed"), ("reduced", "uniform", "fixed"), ("random", "uniform", "fixed"),
                 ("random-constant", "uniform", "constant"), ("random-rslora", "uniform-rslora", "rslora")]
FLATNESS = ["uniform", "sft-uniform", "uniform-rslora"]


# the tables and the figures read the same profiles: each file once
load_profile = functools.lru_cache(maxsize=None)(P.load_profile)


def collect(out: str) -> dict[str, dict[int | None, str]]:
    """{arm: {seed: run folder}} of the finished runs; the base model's seed is None."""
    runs = {}
    for arm in ARMS:
        if rundir.is_finished(os.path.join(out, arm)):
            runs[arm] = {None: os.path.join(out, arm)}
        elif seeds := rundir.seed_runs(os.path.join(out, arm)):
            runs[arm] = {int(os.path.basename(d)[4:]): d for d in seeds}
    return runs


def mean_sd(xs: list[float], scale: float = 1.0, digits: int = 1) -> str:
    xs = [scale * x for x in xs if x == x]  # NaN: "no shift"
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.{digits}f}" + (f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else "")


def accuracy_table(runs: dict) -> tuple[list[str], dict]:
    """Markdown rows: accuracy over seeds, each run's interval, paired tests against uniform."""
    lines = ["| arm | runs | accuracy, mean ± sd over seeds (%) | each run: accuracy (95% Wilson interval) | "
             "vs uniform, same seed: difference (McNemar p) | pooled over seeds: difference (McNemar p) |",
             "| --- | --- | --- | --- | --- | --- |"]
    summary = {}
    for arm, seeds in runs.items():
        res = {s: report.load_results(d) for s, d in seeds.items()}
        each = ", ".join(f"{100 * r['accuracy']:.1f} ({100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f})"
                         for r in res.values())
        paired, b, c = [], 0, 0
        for s, d in seeds.items():
            for us, ud in runs.get("uniform", {}).items():
                if arm != "uniform" and (s is None or s == us):
                    cmp = report.compare(d, ud)
                    paired.append(f"{100 * cmp['diff']:+.1f} (p={cmp['mcnemar_p']:.2g})")
                    b, c = b + cmp["only_a"], c + cmp["only_b"]
        n = next(iter(res.values()))["n"]
        pooled = "-" if not paired else f"{100 * (b - c) / (n * len(paired)):+.1f} (p={report.mcnemar_exact(b, c):.2g})"
        acc = [r["accuracy"] for r in res.values()]
        lines.append(f"| {arm} | {len(res)} | {mean_sd(acc, 100)} | {each} | {'; '.join(paired) or '-'} | {pooled} |")
        summary[arm] = {"accuracy": acc, "n": n, "seeds": [s for s in seeds], "paired_vs_uniform": paired,
                        "pooled_vs_uniform": pooled}
    return lines, summary


def flatness_table(runs: dict) -> tuple[list[str], dict]:
    lines = ["| arm | view | max/min share | top-30% share (%) | early-vs-late r | hottest layer (per seed) |",
             "| --- | --- | --- | --- | --- | --- |"]
    summary = {}
    for arm in [a for a in FLATNESS if a in runs]:
        profiles = [load_profile(d) for d in runs[arm].values()]
        for view, normalised in (("raw", False), ("normalised", True)):
            f = [P.flatness(p, normalised) for p in profiles]
            lines.append(f"| {arm} | {view} | {mean_sd([x['max_min_ratio'] for x in f], digits=2)} | "
                         f"{mean_sd([x['top30_share'] for x in f])} | "
                         f"{mean_sd([x['early_late_corr'] for x in f], digits=3)} | "
                         f"{', '.join(str(x['hottest_layer']) for x in f)} |")
            summary[f"{arm}/{view}"] = f
    return lines, summary


def amplification_table(runs: dict) -> tuple[list[str], dict]:
    lines = ["| arm | scale policy | against | rank~shift r, raw (per seed) | rank~shift r, normalised (per seed) |",
             "| --- | --- | --- | --- | --- |"]
    summary = {}
    for arm, base, policy in AMPLIFICATION:
        pairs = [(runs[arm][s], runs[base][s]) for s in runs.get(arm, {}) if s in runs.get(base, {})]
        if not pairs:
            continue
        cells = []
        for normalised in (False, True):
            r = [P.amplification(load_profile(b), load_profile(a), normalised) for a, b in pairs]
            cells.append(f"{mean_sd(r, digits=2)} ({', '.join('no shift' if x != x else f'{x:+.2f}' for x in r)})")
            summary[f"{arm}/{'normalised' if normalised else 'raw'}"] = r
        lines.append(f"| {arm} | {policy} | {base} | {cells[0]} | {cells[1]} |")
    return lines, summary


def figures(runs: dict, out: str) -> list[str]:
    """shares.png, amplification.png, curves.png; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    # 1. per-layer shares: uniform against every arm, mean over seeds
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for arm in [a for a in ARMS if a in runs and a != "base"]:
        for ax, normalised in zip(axes, (False, True)):
            shares = np.mean([P.layer_shares(load_profile(d), normalised) for d in runs[arm].values()], 0)
            style = dict(lw=2.5, color="black") if arm == "uniform" else dict(lw=1, alpha=0.8)
            ax.plot(np.arange(len(shares)), shares, "o-", ms=3, label=arm, **style)
    for ax, title in zip(axes, ("raw", "rank-normalised (each norm ÷ s·√r)")):
        ax.set(title=f"gradient share per layer, {title}", xlabel="layer", ylabel="% of the gradient")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    made.append(_save(fig, plt, out, "shares.png"))
    # 2. rank vs change of share, one column per scale policy (the random arms: the study's control)
    panels = [(a, b, p) for a, b, p in AMPLIFICATION if a.startswith("random") and a in runs and b in runs]
    if panels:
        fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 7.5), squeeze=False)
        for j, (arm, base, policy) in enumerate(panels):
            for i, normalised in enumerate((False, True)):
                ax, xs, ys = axes[i][j], [], []
                for s in runs[arm]:
                    if s in runs[base]:
                        a, b = load_profile(runs[arm][s]), load_profile(runs[base][s])
                        xs += list(a.layer_ranks)
                        ys += list(P.layer_shares(a, normalised) - P.layer_shares(b, normalised))
                ax.scatter(xs, ys, s=12, alpha=0.7)
                ax.axhline(0, color="grey", lw=0.8)
                view = "normalised" if normalised else "raw"
                ax.set(title=f"{policy}, {view}: r = {P.pearson(xs, ys):+.2f} (seeds pooled)",
                       xlabel="layer rank", ylabel="share change vs uniform (points)")
                ax.grid(alpha=0.3)
        made.append(_save(fig, plt, out, "amplification.png"))
    # 3. training reward and correctness, smoothed, mean over seeds; held-out accuracy per arm
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for arm in [a for a in ARMS if a in runs and a != "base"]:
        curves = [[json.loads(line) for line in open(os.path.join(d, rundir.METRICS))] for d in runs[arm].values()]
        if "reward" not in curves[0][0]:
            continue  # SFT: no reward
        for ax, key in zip(axes, ("reward", "reward/correct")):
            y = np.mean([[m[key] for m in c] for c in curves], 0)
            k = max(1, len(y) // 10)
            ax.plot(np.arange(k, len(y) + 1), np.convolve(y, np.ones(k) / k, "valid"), label=arm)
    for ax, title in zip(axes, ("training reward (moving mean)", "training correctness (moving mean)")):
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    arms = [a for a in ARMS if a in runs]
    for x, arm in enumerate(arms):  # each seed a little to the right of the last
        for i, d in enumerate(runs[arm].values()):
            r = report.load_results(d)
            acc, lo, hi = (100 * v for v in (r["accuracy"], *r["ci95"]))
            axes[2].errorbar(x + 0.15 * (i - (len(runs[arm]) - 1) / 2), acc, yerr=[[acc - lo], [hi - acc]], fmt="o",
                             ms=4, capsize=2, color=f"C{x % 10}")
    axes[2].set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=8)
    axes[2].set(title="held-out accuracy, each run with its 95% Wilson interval", ylabel="%")
    axes[2].grid(alpha=0.3)
    made.append(_save(fig, plt, out, "curves.png"))
    return made


def _save(fig, plt, out: str, name: str) -> str:
    fig.tight_layout()
    rundir.atomic_write(os.path.join(out, name), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return name


def write(out: str) -> str:
    """REPORT.md (tables and figures), summary.json (the numbers) in `out`; returns REPORT.md's path."""
    runs = collect(out)
    if not runs:
        raise SystemExit(f"error: {out}: no finished run of the study's arms ({', '.join(ARMS)})")
    acc, acc_sum = accuracy_table(runs)
    flat, flat_sum = flatness_table(runs)
    amp, amp_sum = amplification_table(runs)
    made = figures(runs, out)
    missing = [a for a in ARMS if a not in runs]
    text = ["# The study in miniature: report", "",
            f"Finished runs: {sum(len(v) for v in runs.values())}" +
            (f"; arms without a finished run: {', '.join(missing)}" if missing else ""), "",
            "## Accuracy", "", *acc, "", "## Flatness of the gradient profile", "", *flat, "",
            "## Amplification: does gradient share follow rank?", "", *amp, ""]
    text += [f"![{name}]({name})" for name in made] or ["(figures need matplotlib: pip install matplotlib)"]
    path = os.path.join(out, "REPORT.md")
    rundir.atomic_lines(path, [line + "\n" for line in text])
    rundir.atomic_json(os.path.join(out, "summary.json"),
                       {"accuracy": acc_sum, "flatness": flat_sum, "amplification": amp_sum, "figures": made})
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python study_report.py STUDY_DIR")
    print(write(sys.argv[1]))
