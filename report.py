"""The study's results table from run folders, with seeds and paired significance tests.

    python report.py RUN_DIR [RUN_DIR ...]              # the table, then the gradient statistics
    python report.py --compare RUN_A RUN_B              # is A's accuracy distinguishable from B's?

The table has the study's columns (strategy, rank range, LoRA parameters, GSM8K accuracy with its
95% Wilson interval, format rate) plus the run folder and the number of test problems, one row per run
in the order given. A `--seeds` parent folder stands for its seed<N> runs; a folder that holds no
finished run is skipped with a note. Runs of one strategy under several seeds get a summary line:
mean and standard deviation of accuracy across seeds, each run counted once.

`--compare` of two `--seeds` parent folders pairs them seed by seed (seed<N> against seed<N>): the
mean of the per-seed differences with its t 95% interval, the exact sign-flip p and the smallest
difference the seeds could detect (stats.py). The training seed is the unit: two seeds of one arm
differ by several points, far more than the test-set noise of one model.

`--compare` of two single runs pairs them problem by problem (their eval_final.jsonl; both must have
been evaluated on the same problems, or it refuses): McNemar's exact test (a binomial test on the
problems exactly one of them solved) and a paired bootstrap 95% interval. That is the test-set noise
of these two trained models only: it says nothing about the arms they were drawn from.

Left out: corrections for multiple comparisons (each arm is compared with uniform alone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import numpy as np

import rundir
import stats
from profiler import report as profile_report, run_label


def load_results(run_dir: str) -> dict:
    path = os.path.join(run_dir, rundir.RESULTS)
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no results (is the run finished?)")
    try:
        return rundir.read_json(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def fmt_params(p: int) -> str:
    return f"{p / 1e6:.1f}M" if p >= 1e6 else f"{p / 1e3:.1f}K" if p else "0"


def finished_runs(paths: list[str]) -> tuple[list[str], list[str]]:
    """(run folders to report, notes on what was skipped): a `--seeds` parent expands into its seed<N>
    folders, a folder without results.json is skipped with a note, a folder named twice counts once;
    the order is the order given."""
    runs, notes, seen = [], [], set()
    for path in paths:
        seeds = rundir.seed_runs(path)
        candidates = seeds if seeds and not rundir.is_finished(path) else [path]
        for d in candidates:
            key = os.path.realpath(d)
            if key in seen:
                continue
            seen.add(key)
            if rundir.is_finished(d):
                runs.append(d)
            else:
                notes.append(f"skipped {d}: no {rundir.RESULTS} (not a finished run)")
    return runs, notes


def results_table(run_dirs: list[str]) -> str:
    """The study's table, one row per run in the order given, and a mean ± std row per strategy run
    under several seeds (each run counted once)."""
    rows = [load_results(d) for d in run_dirs]
    w = max([18, *(len(run_label(d)) for d in run_dirs)])
    lines = [f"{'Run':<{w}} {'Strategy':<18} {'Seed':>4} {'Range':<9} {'Params':>8} {'GSM8K Acc (95% CI)':>24} "
             f"{'Format':>7} {'n':>5}"]
    groups = {}
    for d, r in zip(run_dirs, rows):
        name = r["strategy"] if r.get("algo", "grpo") == "grpo" else f"{r['algo']}:{r['strategy']}"
        groups.setdefault(name, []).append(r)
        rng = f"r={r['rank_min']}-{r['rank_max']}" if r["lora_params"] else "-"
        ci = f"{100 * r['accuracy']:.1f}% ({100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f})"
        lines.append(f"{run_label(d):<{w}} {name:<18} {r['seed']:>4} {rng:<9} "
                     f"{fmt_params(r['lora_params']):>8} {ci:>24} {100 * r['format_rate']:>6.1f}% {r['n']:>5}")
    multi = {k: v for k, v in groups.items() if len({r["seed"] for r in v}) > 1}
    if multi:
        lines += ["", f"{'Across seeds':<18} {'runs':>4} {'mean acc':>9} {'t 95% interval':>15} {'std':>6} "
                      f"{'min':>6} {'max':>6}"]
        for name, rs in multi.items():
            acc = [100 * r["accuracy"] for r in rs]
            _, lo, hi = stats.mean_interval(acc)
            lines.append(f"{name:<18} {len(rs):>4} {statistics.mean(acc):>8.1f}% {f'{lo:.1f}-{hi:.1f}':>15} "
                         f"{statistics.stdev(acc):>6.1f} {min(acc):>6.1f} {max(acc):>6.1f}")
    return "\n".join(lines)


def full_report(paths: list[str]) -> str:
    """The table, then profiler.py's gradient statistics of the runs that have a profile."""
    run_dirs, notes = finished_runs(paths)
    if not run_dirs:
        skipped = f" ({'; '.join(notes)})" if notes else ""
        raise SystemExit(f"error: no finished run among {', '.join(paths)}{skipped}")
    text = results_table(run_dirs) + "".join(f"\n({note})" for note in notes)
    profiled = [d for d in run_dirs if os.path.isfile(os.path.join(d, rundir.PROFILE))]
    if profiled:
        text += "\n\nGradient statistics (shares in %, raw and rank-normalised):\n" + profile_report(profiled)
    return text


# --------------------------------------------------------------------------------- paired comparison

def load_correct(run_dir: str) -> dict[int, bool]:
    path = os.path.join(run_dir, rundir.eval_records("final"))
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no evaluation records")
    with open(path) as f:
        return {r["index"]: bool(r["correct"]) for r in map(json.loads, f)}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b, c = problems only the first / only the second run solved."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b) over problems resampled with replacement (pairs kept)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    diff = a[idx].mean(1) - b[idx].mean(1)
    return float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))


def compare(run_a: str, run_b: str) -> dict:
    ca, cb = load_correct(run_a), load_correct(run_b)
    if set(ca) != set(cb):  # a pairing over the overlap would silently compare other test sets
        raise SystemExit(f"error: {run_a} and {run_b} were evaluated on different problems ({len(ca)} and {len(cb)} "
                         f"problems, {len(set(ca) & set(cb))} shared); evaluate both on the same set (--eval-n)")
    common = sorted(ca)
    a = np.array([ca[i] for i in common], float)
    b = np.array([cb[i] for i in common], float)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    lo, hi = paired_bootstrap(a, b)
    return {"n": len(common), "acc_a": a.mean(), "acc_b": b.mean(), "diff": a.mean() - b.mean(),
            "only_a": only_a, "only_b": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b), "diff_ci95": (lo, hi)}


def compare_seeds(parent_a: str, parent_b: str) -> dict:
    """Two --seeds parents paired seed by seed: stats.paired of the accuracy differences (points)."""
    a, b = ({int(os.path.basename(d)[4:]): d for d in rundir.seed_runs(p)} for p in (parent_a, parent_b))
    shared = sorted(set(a) & set(b))
    if not shared:
        raise SystemExit(f"error: {parent_a} and {parent_b} share no finished seed<N> run "
                         f"(seeds {sorted(a)} and {sorted(b)})")
    diffs = {s: 100 * (load_results(a[s])["accuracy"] - load_results(b[s])["accuracy"]) for s in shared}
    return {"per_seed": diffs, **stats.paired(list(diffs.values()))}


def main(argv=None):
    ap = argparse.ArgumentParser(description="The study's results table, seeds and paired tests.")
    ap.add_argument("runs", nargs="*", help="run folders holding results.json")
    ap.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="paired test between two runs")
    args = ap.parse_args(argv)
    if args.compare and all(rundir.seed_runs(p) and not rundir.is_finished(p) for p in args.compare):
        r = compare_seeds(*args.compare)
        print(f"{r['n']} seeds paired: " + ", ".join(f"seed {s} {d:+.1f}" for s, d in r["per_seed"].items()))
        if r["n"] > 1:
            lo, hi = r["ci95"]
            print(f"mean difference {r['mean']:+.1f} points (t 95% interval {lo:+.1f} to {hi:+.1f}), sign-flip p = "
                  f"{r['p_sign_flip']:.3f}; detectable at 80% power: {r['detectable']:.1f} points")
    elif args.compare:
        r = compare(*args.compare)
        print(f"{r['n']} paired problems: {100 * r['acc_a']:.1f}% vs {100 * r['acc_b']:.1f}% "
              f"(difference {100 * r['diff']:+.1f} points, paired bootstrap 95% CI "
              f"{100 * r['diff_ci95'][0]:+.1f} to {100 * r['diff_ci95'][1]:+.1f})")
        print(f"solved by only A: {r['only_a']}, only B: {r['only_b']}; McNemar exact p = {r['mcnemar_p']:.4f}"
              f" -> {'distinguishable' if r['mcnemar_p'] < 0.05 else 'not distinguishable'} at the 5% level")
    if args.runs:
        print(full_report(args.runs))
    if not args.runs and not args.compare:
        ap.error("give run folders, or --compare RUN_A RUN_B")


if __name__ == "__main__":
    sys.exit(main())
