"""The study's report, from its run folders alone: tables, figures and a markdown summary.

    python study_report.py study/            # writes study/REPORT.md, study/summary.json, study/*.png

It reads what train.py wrote in <study>/<arm>/seed<N> (results.json, eval_final.jsonl, metrics.jsonl,
profile.safetensors) and reports, for each of the study's claims, with the training seed as the unit
(stats.py defines every statistic):
  accuracy        per arm: the mean over seeds with its t interval; against its reference arm (uniform,
                  or the SFT arm at r0 for the SFT sweep), the per-seed differences (seed s of the arm
                  minus seed s of the reference), their mean with its t 95% interval, the exact
                  sign-flip p and the smallest difference detectable at 80% power. McNemar's test per
                  seed is in a table of its own: it measures the test-set noise of one pair of models.
  capacity        the positive control: uniform rank r under GRPO and under SFT, accuracy against rank
  flatness        per arm, from its own profiles: the study's max/min and top-30% share, and the
                  layer-count-free effective layers / L and Gini, each also without layer 0; against a
                  reference: the same run's profile at step 0 (fresh LoRA on the base model, before any
                  update: the gradient geometry of the model), and the other regime's profile
  amplification   the correlation over layers of rank and change of gradient share against the
                  same seed's uniform run, raw and rank-normalised, per scale policy
A statistic that cannot be computed (one seed; a profile without gradient) prints as "-", never NaN.
Figures need matplotlib (requirements-dev.txt); without it the report says so and keeps the tables.

Left out: running anything (study.py), and significance corrections across the many comparisons.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import sys

import numpy as np

import profiler as P
import report
import rundir
import stats

R0 = 8  # the organism preset's rank: the sweep's r = R0 runs are the uniform and sft-uniform arms
SWEEP_RANKS = (1, 2, 4, 16)
MAIN = ["base", "uniform", "proportional", "reduced", "random", "sft-uniform"]
SIDE = ["dynamic", "random-constant", "random-rslora"]  # the open claims and the scale-policy ablation
SWEEP = [f"{regime}-r{r}" for regime in ("uniform", "sft") for r in SWEEP_RANKS]
ARMS = MAIN + SIDE + SWEEP
# amplification: (arm with moved rank, its scale policy); each against the same seed's uniform run
# (rsLoRA's alpha is set so that its scale at r0 is the fixed policy's: uniform is the same run under both)
AMPLIFICATION = [("proportional", "fixed"), ("reduced", "fixed"), ("random", "fixed"),
                 ("random-constant", "constant"), ("random-rslora", "rslora")]
FLATNESS = ["uniform", "sft-uniform"]  # uniform ranks: raw shares are not moved by the allocation


def reference(arm: str) -> str | None:
    """The arm an arm's accuracy is paired with: uniform, or sft-uniform for the SFT sweep."""
    if arm == "uniform":
        return None
    return "sft-uniform" if arm.startswith("sft-r") else "uniform"


def sweep_rank(arm: str) -> tuple[str, int] | None:
    """("grpo" | "sft", rank) of a capacity-sweep arm or of the two r0 arms; None otherwise."""
    if arm in ("uniform", "sft-uniform"):
        return ("grpo" if arm == "uniform" else "sft"), R0
    if arm in SWEEP:
        regime, r = arm.rsplit("-r", 1)
        return ("grpo" if regime == "uniform" else "sft"), int(r)
    return None


# the tables and the figures read the same files: each once
load_profile = functools.lru_cache(maxsize=None)(P.load_profile)
load_results = functools.lru_cache(maxsize=None)(report.load_results)


def collect(out: str) -> dict[str, dict[int | None, str]]:
    """{arm: {seed: run folder}} of the finished runs; the base model's seed is None."""
    runs = {}
    for arm in ARMS:
        if rundir.is_finished(os.path.join(out, arm)):
            runs[arm] = {None: os.path.join(out, arm)}
        elif seeds := rundir.seed_runs(os.path.join(out, arm)):
            runs[arm] = dict(sorted((int(os.path.basename(d)[4:]), d) for d in seeds))
    return runs


def unfinished(out: str) -> list[str]:
    """The study's run folders that were started (config.json) but not finished (no results.json): a
    report leaves them out, and says which."""
    started = [os.path.dirname(p) for arm in ARMS for p in (glob.glob(os.path.join(out, arm, rundir.CONFIG)) +
                                                         glob.glob(os.path.join(out, arm, "seed*", rundir.CONFIG)))]
    return sorted(os.path.relpath(d, out) for d in started if not rundir.is_finished(d))


def check_comparable(runs: dict, out: str):
    """One preset and one run length in a report (the base model trains nothing: its length is free);
    a mix is refused in one line, since every paired difference would compare unlike runs."""
    kinds = {}
    for arm, seeds in runs.items():
        for d in seeds.values():
            steps = None if arm == "base" else load_results(d).get("steps")
            kinds.setdefault(P.run_config(d).get("preset"), {}).setdefault(steps, []).append(d)
    lengths = {s for by_steps in kinds.values() for s in by_steps if s is not None}
    if len(kinds) > 1 or len(lengths) > 1:
        mix = "; ".join(f"preset {p}, {s if s is not None else 'any'} steps: {len(ds)} run(s), e.g. {ds[0]}"
                        for p, by_steps in kinds.items() for s, ds in by_steps.items())
        raise SystemExit(f"error: {out} mixes runs of different presets or lengths ({mix}); report them apart")


def accuracy(run_dir: str) -> float:
    return 100 * load_results(run_dir)["accuracy"]


def paired_runs(runs: dict, arm: str, against: str) -> dict[int, tuple[str, str]]:
    """{seed: (the arm's run, the reference's run of that seed)}; the base model (no seed) is paired
    with every seed of the reference."""
    ref, mine = runs.get(against, {}), runs[arm]
    if None in mine:
        return {s: (mine[None], d) for s, d in ref.items()}
    return {s: (d, ref[s]) for s, d in mine.items() if s in ref}


def seed_differences(runs: dict, arm: str, against: str) -> dict[int, float]:
    """{seed: accuracy of the arm's seed-s run minus the reference's seed-s run} (points)."""
    return {s: accuracy(a) - accuracy(b) for s, (a, b) in paired_runs(runs, arm, against).items()}


def fmt(x: float, digits: int = 1, sign: bool = False) -> str:
    """A number, or "-" where it could not be computed (NaN)."""
    if x is None or x != x:
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def verdict(p: dict, digits: int = 1) -> str:
    """One line: a difference, or a null result with the smallest difference it could have seen."""
    if p["n"] < 2:
        return "one seed: no interval"
    lo, hi = p["ci95"]
    by_t, by_sign = lo > 0 or hi < 0, p["p_sign_flip"] <= 0.05
    floor = 2 / 2 ** p["n"]  # the exact test's smallest p: it assumes nothing, but needs seeds
    if by_t and by_sign:
        return "differs (t interval excludes 0, sign-flip p <= 0.05)"
    if by_t:
        return (f"differs by t only: {p['n']} seeds cannot give a sign-flip p below {floor:.3g}" if floor > 0.05 else
                f"differs by t only (sign-flip p = {p['p_sign_flip']:.3f})")
    if by_sign:
        return f"differs by the sign-flip test only (p = {p['p_sign_flip']:.3f}); the t interval includes 0"
    if p["sd"] == 0:
        return "no difference: every seed gave the same difference"
    return f"no difference seen; detectable: {fmt(p['detectable'], digits)}"


def accuracy_table(runs: dict) -> tuple[list[str], dict]:
    """Markdown rows: each arm over seeds, and paired by seed against its reference arm."""
    lines = ["| arm | seeds | accuracy: mean [t 95%] (%) | against | difference, mean of per-seed (points) "
             "[t 95%] | sign-flip p | detectable at 80% power | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    summary = {}
    for arm, seeds in runs.items():
        acc = [accuracy(d) for d in seeds.values()]
        mean, lo, hi = stats.mean_interval(acc)
        row = {"seeds": list(seeds), "accuracy": acc, "mean": mean, "ci95": [lo, hi]}
        cells = ["-"] * 5
        against = reference(arm)
        diffs = seed_differences(runs, arm, against) if against in runs else {}
        if diffs:
            p = stats.paired(list(diffs.values()))
            row["vs"] = {"against": against, "per_seed": diffs, **p}
            cells = [against, f"{fmt(p['mean'], sign=True)} [{fmt(p['ci95'][0], sign=True)}, "
                     f"{fmt(p['ci95'][1], sign=True)}]", fmt(p["p_sign_flip"], 3), fmt(p["detectable"]), verdict(p)]
        interval = f" [{lo:.1f}, {hi:.1f}]" if len(acc) > 1 else ""
        lines.append(f"| {arm} | {len(acc)} | {mean:.1f}{interval} | " + " | ".join(cells) + " |")
        summary[arm] = row
    return lines, summary


def mcnemar_table(runs: dict) -> list[str]:
    """Per seed, each arm against the same seed's reference: McNemar on the problems (test-set noise)."""
    lines = ["| arm | against | per seed: difference (McNemar p) |", "| --- | --- | --- |"]
    for arm, seeds in runs.items():
        against = reference(arm)
        cells = []
        for s, (d, rd) in (paired_runs(runs, arm, against) if against in runs else {}).items():
            c = report.compare(d, rd)
            cells.append(f"{'' if None in seeds else f's{s} '}{100 * c['diff']:+.1f} (p={c['mcnemar_p']:.2g})")
        if cells:
            lines.append(f"| {arm} | {against} | {'; '.join(cells)} |")
    return lines


def capacity_table(runs: dict) -> tuple[list[str], dict]:
    """Accuracy against uniform rank, per regime (the positive control for allocation)."""
    lines = ["| regime | rank | seeds | accuracy: mean [t 95%] (%) |", "| --- | --- | --- | --- |"]
    summary = {}
    for arm in sorted((a for a in runs if sweep_rank(a)), key=sweep_rank):
        regime, r = sweep_rank(arm)
        acc = [accuracy(d) for d in runs[arm].values()]
        mean, lo, hi = stats.mean_interval(acc)
        lines.append(f"| {regime} | {r} | {len(acc)} | {mean:.1f}" + (f" [{lo:.1f}, {hi:.1f}] |" if len(acc) > 1 else " |"))
        summary.setdefault(regime, {})[r] = {"arm": arm, "accuracy": acc, "mean": mean, "ci95": [lo, hi]}
    return (lines if summary else []), summary


def shape(shares: np.ndarray) -> dict:
    """Flatness of one share vector, with and without layer 0."""
    rest = shares[1:]
    return {"max_min": shares.max() / shares.min() if shares.min() > 0 else float("nan"),
            "top30": P.top_share(shares, 0.3), "eff": stats.effective_layers(shares), "gini": stats.gini(shares),
            "eff_no0": stats.effective_layers(rest), "gini_no0": stats.gini(rest),
            "layer0": float(shares[0] / shares.sum() * 100), "hottest": int(shares.argmax())}


def has_signal(p: P.Profile, steps: slice = slice(None)) -> bool:
    """True when the profile's steps carry any gradient at all (a step without signal has zero norms)."""
    return bool(np.nansum(p.grad_norms[steps]) > 0)


def flatness_table(runs: dict) -> tuple[list[str], dict]:
    """Each arm's own profiles: over training, and at step 0 (the reference), mean ± sd over seeds."""
    keys = ("max_min", "top30", "eff", "eff_no0", "gini", "gini_no0", "layer0")
    lines = ["| arm | profile | seeds | max/min | top-30% (%) | eff. layers / L | eff. layers / L, no layer 0 | "
             "Gini | Gini, no layer 0 | layer 0's share (%) | hottest layer (per seed) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    summary = {}
    for arm in [a for a in FLATNESS if a in runs]:
        profiles = {s: load_profile(d) for s, d in runs[arm].items()}
        for view in ("over training", "step 0"):
            steps = _steps(view)
            live = {s: p for s, p in profiles.items() if has_signal(p, steps)}
            if not live:
                lines.append(f"| {arm} | {view} | {len(profiles)} | no signal |" + " |" * 7)
                continue
            each = [shape(P.layer_shares(p, steps=steps)) for p in live.values()]
            row = {"seeds": list(live), **{k: [e[k] for e in each] for k in keys + ("hottest",)}}
            digits = {"max_min": 2, "eff": 3, "eff_no0": 3, "gini": 3, "gini_no0": 3}
            lines.append(f"| {arm} | {view} | {len(live)} | " + " | ".join(
                mean_sd(row[k], digits.get(k, 1)) for k in keys) + f" | {', '.join(map(str, row['hottest']))} |")
            summary[f"{arm}/{view}"] = row
    return lines, summary


def flatness_comparisons(runs: dict, flat: dict) -> tuple[list[str], dict]:
    """Is GRPO's profile flatter than its reference? Paired by seed: over training minus step 0 (the
    same run), and GRPO minus SFT (the same seed), of effective layers / L and Gini."""
    lines = ["| comparison | measure | per-seed difference: mean [t 95%] | detectable at 80% power | verdict |",
             "| --- | --- | --- | --- | --- |"]
    summary = {}
    pairs = [(f"{arm}: over training - step 0", arm, "over training", arm, "step 0") for arm in FLATNESS]
    pairs.append(("GRPO - SFT (uniform, over training)", "uniform", "over training", "sft-uniform", "over training"))
    for name, arm_a, view_a, arm_b, view_b in pairs:
        a, b = flat.get(f"{arm_a}/{view_a}"), flat.get(f"{arm_b}/{view_b}")
        if not (a and b):
            continue
        for key, label in (("eff", "eff. layers / L"), ("gini", "Gini")):
            va, vb = dict(zip(a["seeds"], a[key])), dict(zip(b["seeds"], b[key]))
            diffs = [va[s] - vb[s] for s in va if s in vb]
            if not diffs:
                continue
            p = stats.paired(diffs)
            lines.append(f"| {name} | {label} | {fmt(p['mean'], 3, True)} [{fmt(p['ci95'][0], 3, True)}, "
                         f"{fmt(p['ci95'][1], 3, True)}] | {fmt(p['detectable'], 3)} | {verdict(p, 3)} |")
            summary[f"{name}/{key}"] = {"diffs": diffs, **p}
    return (lines if summary else []), summary


def _steps(view: str) -> slice:
    return slice(0, 1) if view == "step 0" else slice(None)


def correlation_table(runs: dict) -> tuple[list[str], dict]:
    """Stability against references: early vs late, against its own step 0, and GRPO against SFT."""
    lines = ["| arm | early vs late r | r with its own step 0 | r with the other regime, same seed |",
             "| --- | --- | --- | --- |"]
    summary = {}
    other = {"uniform": "sft-uniform", "sft-uniform": "uniform"}
    for arm in [a for a in FLATNESS if a in runs]:
        early, first, cross = [], [], []
        for s, d in runs[arm].items():
            p = load_profile(d)
            if not has_signal(p):
                continue
            shares = P.layer_shares(p)
            early.append(P.early_late(p))
            if has_signal(p, slice(0, 1)):
                first.append(P.pearson(shares, P.layer_shares(p, steps=slice(0, 1))))
            if s in runs.get(other[arm], {}) and has_signal(q := load_profile(runs[other[arm]][s])):
                cross.append(P.pearson(shares, P.layer_shares(q)))
        lines.append(f"| {arm} | {mean_sd(early, 3)} | {mean_sd(first, 3)} | {mean_sd(cross, 3)} |")
        summary[arm] = {"early_late": early, "with_step0": first, "with_other_regime": cross}
    return lines, summary


def mean_interval_text(xs: list[float], digits: int = 2) -> str:
    """Mean over seeds with its t 95% interval, e.g. "-0.81 [-0.95, -0.67]" ("-" without a value)."""
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    m, lo, hi = stats.mean_interval(xs)
    return fmt(m, digits, True) + (f" [{fmt(lo, digits, True)}, {fmt(hi, digits, True)}]" if len(xs) > 1 else "")


def mean_sd(xs: list[float], digits: int = 1) -> str:
    xs = [x for x in xs if x == x]  # NaN: "no shift" or no signal
    if not xs:
        return "-"
    sd = f" ± {np.std(xs, ddof=1):.{digits}f}" if len(xs) > 1 else ""
    return f"{np.mean(xs):.{digits}f}{sd}"


def amplification_table(runs: dict) -> tuple[list[str], dict]:
    lines = ["| arm | scale policy | rank~shift r, raw: mean [t 95%] (per seed) | rank~shift r, normalised |",
             "| --- | --- | --- | --- |"]
    summary = {}
    for arm, policy in AMPLIFICATION:
        pairs = list(paired_runs(runs, arm, "uniform").values()) if arm in runs else []
        if not pairs:
            continue
        cells = []
        for normalised in (False, True):
            r, each = [], []
            for a, b in pairs:
                if not (has_signal(load_profile(a)) and has_signal(load_profile(b))):
                    r.append(float("nan"))
                    each.append("no signal")
                    continue
                r.append(P.amplification(load_profile(b), load_profile(a), normalised))
                each.append("no shift" if r[-1] != r[-1] else f"{r[-1]:+.2f}")
            cells.append(f"{mean_interval_text(r)} ({', '.join(each)})")
            summary[f"{arm}/{'normalised' if normalised else 'raw'}"] = r
        lines.append(f"| {arm} | {policy} | {cells[0]} | {cells[1]} |")
    return lines, summary


def figures(runs: dict, out: str, cap: dict) -> list[str]:
    """capacity.png (from capacity_table's summary), shares.png, amplification.png, curves.png; [] without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    # 1. the positive control: accuracy against rank, per regime, each with its seeds' t interval
    if cap:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for regime, rows in cap.items():
            rs = sorted(rows)
            m = np.array([rows[r]["mean"] for r in rs])
            lo, hi = (np.array([rows[r]["ci95"][i] for r in rs]) for i in (0, 1))
            ax.errorbar(rs, m, yerr=[m - lo, hi - m], fmt="o-", capsize=3, label=regime.upper())
            for r in rs:
                ax.scatter([r] * len(rows[r]["accuracy"]), rows[r]["accuracy"], s=8, alpha=0.4, color="grey")
        if "base" in runs:
            ax.axhline(accuracy(runs["base"][None]), color="black", lw=0.8, ls="--", label="base model")
        ax.set_xscale("log", base=2)
        ax.set(title="capacity: uniform rank r (mean, t 95% interval; dots: seeds)", xlabel="LoRA rank r",
               ylabel="held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        made.append(_save(fig, plt, out, "capacity.png"))
    # 2. per-layer shares, mean over seeds, with the step-0 reference dashed
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, arm in enumerate(a for a in FLATNESS if a in runs):
        profiles = [load_profile(d) for d in runs[arm].values()]
        for steps, ls, what in ((slice(None), "-", "over training"), (slice(0, 1), "--", "step 0")):
            live = [P.layer_shares(p, steps=steps) for p in profiles if has_signal(p, steps)]
            if live:
                shares = np.mean(live, 0)
                ax.plot(np.arange(len(shares)), shares, "o" + ls, ms=3, color=f"C{i}", label=f"{arm}, {what}")
    ax.set(title="gradient share per layer (mean over seeds)", xlabel="layer", ylabel="% of the gradient")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    made.append(_save(fig, plt, out, "shares.png"))
    # 3. rank vs change of share for the random arms (the study's control), seeds pooled
    panels = [(a, p) for a, p in AMPLIFICATION if a.startswith("random") and a in runs and "uniform" in runs]
    if panels:
        fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 7.5), squeeze=False)
        for j, (arm, policy) in enumerate(panels):
            for i, normalised in enumerate((False, True)):
                ax, xs, ys = axes[i][j], [], []
                for s in runs[arm]:
                    if s in runs["uniform"]:
                        a, b = load_profile(runs[arm][s]), load_profile(runs["uniform"][s])
                        xs += list(a.layer_ranks)
                        ys += list(P.layer_shares(a, normalised) - P.layer_shares(b, normalised))
                ax.scatter(xs, ys, s=12, alpha=0.7)
                ax.axhline(0, color="grey", lw=0.8)
                view = "normalised" if normalised else "raw"
                ax.set(title=f"{policy}, {view}: r = {fmt(P.pearson(xs, ys), 2, True)} (seeds pooled)",
                       xlabel="layer rank", ylabel="share change vs uniform (points)")
                ax.grid(alpha=0.3)
        made.append(_save(fig, plt, out, "amplification.png"))
    # 4. training correctness (GRPO arms), smoothed, mean over seeds
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in [a for a in MAIN + SIDE if a in runs and a != "base"]:
        curves = [[json.loads(line) for line in open(os.path.join(d, rundir.METRICS))] for d in runs[arm].values()]
        if "reward/correct" not in curves[0][0]:
            continue  # SFT: no reward
        y = np.mean([[m["reward/correct"] for m in c] for c in curves], 0)
        k = max(1, len(y) // 10)
        ax.plot(np.arange(k, len(y) + 1), np.convolve(y, np.ones(k) / k, "valid"), label=arm)
    ax.set(title="training correctness (moving mean, mean over seeds)", xlabel="step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    made.append(_save(fig, plt, out, "curves.png"))
    return made


def _save(fig, plt, out: str, name: str) -> str:
    fig.tight_layout()
    rundir.atomic_write(os.path.join(out, name), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return name


def provenance(runs: dict) -> str:
    """The code and the PyTorch build the runs were made with (from their results.json), as one line."""
    seen = set()
    for seeds in runs.values():
        for d in seeds.values():
            r = load_results(d)
            seen.add((r.get("code_version", "not recorded"), r.get("torch_version", "not recorded")))
    return "; ".join(f"code {c}, torch {t}" for c, t in sorted(seen))


def write(out: str) -> str:
    """REPORT.md (tables and figures), summary.json (the numbers) in `out`; returns REPORT.md's path."""
    runs = collect(out)
    if not runs:
        raise SystemExit(f"error: {out}: no finished run of the study's arms ({', '.join(ARMS)})")
    check_comparable(runs, out)
    acc, acc_sum = accuracy_table(runs)
    cap, cap_sum = capacity_table(runs)
    flat, flat_sum = flatness_table(runs)
    flat_cmp, flat_cmp_sum = flatness_comparisons(runs, flat_sum)
    corr, corr_sum = correlation_table(runs)
    amp, amp_sum = amplification_table(runs)
    made = figures(runs, out, cap_sum)
    missing, started = [a for a in ARMS if a not in runs], unfinished(out)
    text = ["# The study in miniature: report", "",
            f"Finished runs: {sum(len(v) for v in runs.values())}" +
            (f"; arms without a finished run: {', '.join(missing)}" if missing else "") +
            (f"; unfinished runs left out: {', '.join(started)}" if started else "") + ".",
            f"Made with: {provenance(runs)}.", "",
            "## Accuracy, the seed as the unit", "",
            "Each seed of an arm against the same seed of its reference; intervals are Student's t over seeds, "
            "p is the exact sign-flip test (its smallest possible value is 2/2^n), and a null result carries the "
            "smallest difference the seeds could have detected (stats.py).", "", *acc, ""]
    if cap:
        text += ["## Capacity: the positive control", "", *cap, ""]
    text += ["## Test-set noise of single pairs (McNemar, per seed: not a verdict)", "", *mcnemar_table(runs), "",
             "## Flatness of the gradient profile, and its reference at step 0", "", *flat, "", *flat_cmp, "",
             *corr, "",
             "## Amplification: does gradient share follow rank?", "", *amp, ""]
    text += [f"![{name}]({name})" for name in made] or ["(figures need matplotlib: pip install matplotlib)"]
    path = os.path.join(out, "REPORT.md")
    rundir.atomic_lines(path, [line + "\n" for line in text])
    rundir.atomic_json(os.path.join(out, "summary.json"), _finite(
        {"accuracy": acc_sum, "capacity": cap_sum, "flatness": flat_sum, "flatness_comparisons": flat_cmp_sum,
         "stability": corr_sum,
         "amplification": amp_sum, "figures": made}))
    return path


def _finite(x):
    """summary.json without NaN (not JSON): a statistic that could not be computed is null."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python study_report.py STUDY_DIR")
    print(write(sys.argv[1]))
