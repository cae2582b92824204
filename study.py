"""The study in miniature: the study's whole matrix, run on the CPU model organism, then its report.

    python study.py                          # organism built once, the whole matrix, study/REPORT.md
    python study.py --quick                  # the main arms on 3 seeds, study-quick/REPORT.md
    python study.py --report-only            # the report again, from the run folders alone

The matrix (`matrix()`). Main arms, on 8 seeds (paired by seed, the unit of replication: about 8
are needed to see the study's 4.5 points; stats.py): the base model; GRPO with uniform, proportional
and reduced ranks (both from the same seed's uniform profile) and random ranks; SFT with uniform
ranks, for the regime comparison. Side arms, on the first 4 seeds: dynamic ranks; the scale-policy
ablation (random ranks under rsLoRA and under the constant policy, beside the fixed policy of the
main arms); and the capacity sweep, the positive control: uniform r in 1, 2, 4, 16 under GRPO and
under SFT (r0 = 8 is the main arms). Uniform is not run under `constant` or rsLoRA: with every module
at r0 both give the fixed policy's scale (rsLoRA gets alpha/sqrt(r0), so that every policy starts
from the same scale at r0), and the run would be the uniform run again.

Each run is `python train.py --preset organism ...` in a process of its own, in <out>/<arm>/seed<N>
(its log beside it in <out>/logs/), so a run here is exactly a run a reader can repeat by hand. A
finished run is skipped and an unfinished one resumed, so a killed study continues where it stopped.
`--jobs` runs go at once (default 2, one CPU thread each); one progress line counts the whole matrix.

Left out: what the report says (study_report.py), and hyperparameter search: every arm runs the
preset's settings.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import rundir

# config, organism and study_report import torch (seconds; 25 s on a busy machine): they are imported
# where they are used, after the arguments that need no project code are checked, so a typo costs nothing

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Job:
    arm: str  # the report's name for it, e.g. "random-rslora"
    seed: int | None  # None: the base model (greedy evaluation does not depend on a seed)
    flags: list[str]
    needs: str | None = None  # a run that must be finished first (the profile behind an allocation)

    @property
    def dir_name(self) -> str:
        return self.arm if self.seed is None else os.path.join(self.arm, f"seed{self.seed}")


def matrix(out: str, seeds: list[int], side_seeds: list[int], extra: list[str], preset: str = "organism",
           arms: list[str] | None = None) -> list[Job]:
    """Every run of the study (of `arms`, default all), in an order that lets each start as soon as its
    profile exists: the main arms on `seeds`, the side arms and the capacity sweep on `side_seeds`."""
    import study_report
    from config import PRESETS
    arms = study_report.ARMS if arms is None else arms
    r0, alpha = PRESETS[preset]["rank"], PRESETS[preset]["alpha"]
    assert r0 == study_report.R0, "study_report.R0 is the preset's rank: the sweep's r0 runs are the main arms"
    # rsLoRA with the preset's alpha would scale every adapter by sqrt(r0) more than the fixed policy at
    # r0 (2.8x at r0 = 8, a higher learning rate in effect); its alpha is set so that all three policies
    # give the same scale at r0 and differ only in how the scale changes with rank, which is the question
    rslora = ["--scale-policy", "rslora", "--alpha", repr(alpha / math.sqrt(r0))]
    jobs = [Job("base", None, ["--strategy", "base"])]
    for s in seeds:
        uniform = os.path.join(out, "uniform", f"seed{s}")
        jobs += [Job("uniform", s, ["--strategy", "uniform"]),
                 Job("sft-uniform", s, ["--algo", "sft", "--strategy", "uniform"]),
                 Job("random", s, ["--strategy", "random"]),
                 Job("proportional", s, ["--strategy", "proportional", "--profile", uniform], needs=uniform),
                 Job("reduced", s, ["--strategy", "reduced", "--profile", uniform], needs=uniform)]
    for s in side_seeds:
        jobs += [Job("dynamic", s, ["--strategy", "dynamic"]),
                 Job("random-rslora", s, ["--strategy", "random", *rslora]),
                 Job("random-constant", s, ["--strategy", "random", "--scale-policy", "constant"])]
        # the capacity sweep keeps the preset's alpha: the fixed policy's scale alpha/r is LoRA's 1/r
        # convention, under which the best learning rate hardly moves with the rank
        for r in study_report.SWEEP_RANKS:
            jobs += [Job(f"uniform-r{r}", s, ["--strategy", "uniform", "--rank", str(r)]),
                     Job(f"sft-r{r}", s, ["--algo", "sft", "--strategy", "uniform", "--rank", str(r)])]
    jobs = [j for j in jobs if j.arm in arms]
    for job in jobs:
        seed = [] if job.seed is None else ["--seed", str(job.seed)]
        job.flags = ["--preset", preset, *job.flags, *extra, *seed]
    # what a partial study can already report comes first: the main arms on the first 3 seeds (the
    # quick study), then the capacity sweep, then the other seeds, then the side arms. A run whose
    # profile is not finished yet waits (run_matrix) while the next ones start.
    first = set(seeds[:3])
    order = lambda j: (0 if j.arm in study_report.MAIN and (j.seed is None or j.seed in first) else
                       1 if j.arm in study_report.SWEEP else 2 if j.arm in study_report.MAIN else 3)
    return sorted(jobs, key=order)


def command(job: Job, out: str) -> list[str]:
    """train.py's command line for this job: a fresh run, or --resume of an unfinished one."""
    run_dir = os.path.join(out, job.dir_name)
    if os.path.isfile(os.path.join(run_dir, rundir.CONFIG)):
        return [sys.executable, os.path.join(HERE, "train.py"), "--resume", run_dir, "--threads", "1"]
    return [sys.executable, os.path.join(HERE, "train.py"), *job.flags, "--threads", "1", "--out", run_dir]


def die_with_parent():
    """In a child, before exec: ask Linux to send it SIGTERM when study.py dies, however it dies, so a
    killed study leaves no run writing behind it (its folder lock would refuse the rerun's resume)."""
    parent = os.getppid()
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the folder lock still keeps an orphan and a rerun apart
    if os.getppid() != parent:  # the study died before the request was in place
        os._exit(1)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_matrix(jobs: list[Job], out: str, parallel: int, log=print) -> list[str]:
    """Run every unfinished job, `parallel` at a time; returns what failed (with its log file)."""
    todo = [j for j in jobs if not rundir.is_finished(os.path.join(out, j.dir_name))]
    total, done, failed, running = len(jobs), len(jobs) - len(todo), {}, []
    if done:
        log(f"study: {done} of {total} runs already finished (skipped)")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    t0, durations = time.perf_counter(), []
    try:
        while todo or running:
            for job, proc, started, logf in list(running):
                if proc.poll() is None:
                    continue
                running.remove((job, proc, started, logf))
                logf.close()
                durations.append(time.perf_counter() - started)
                done += 1
                if proc.returncode != 0:
                    failed[os.path.join(out, job.dir_name)] = f"{job.dir_name} (see {logf.name})"
                eta = sum(durations) / len(durations) * (len(todo) + len(running)) / parallel
                log(f"study: run {done} of {total} {'FAILED' if proc.returncode else 'done'} ({job.dir_name}, "
                    f"{minutes(durations[-1])}) | elapsed {minutes(time.perf_counter() - t0)} | ETA {minutes(eta)}")
            for job in [j for j in todo if j.needs in failed]:  # the run behind its profile failed
                todo.remove(job)
                failed[os.path.join(out, job.dir_name)] = f"{job.dir_name} (not run: {job.needs} failed)"
            ready = [j for j in todo if j.needs is None or rundir.is_finished(j.needs)]
            while ready and len(running) < parallel:
                job = ready.pop(0)
                todo.remove(job)
                path = os.path.join(out, "logs", job.dir_name.replace(os.sep, "-") + ".log")
                logf = open(path, "a")
                proc = subprocess.Popen(command(job, out), stdout=logf, stderr=subprocess.STDOUT, cwd=HERE,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=die_with_parent)
                running.append((job, proc, time.perf_counter(), logf))
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl-C reached every run too: each writes a checkpoint; wait for them
        for _, proc, _, _ in running:
            proc.wait()
        raise SystemExit(f"\nstudy: interrupted; {len(running)} run(s) stopped at a checkpoint; the same command "
                         f"continues the study")
    return list(failed.values())


def parse_seeds(text: str, flag: str) -> list[int]:
    try:
        return rundir.parse_seeds(text)
    except ValueError as e:
        raise SystemExit(f"error: {flag} {e}")


def check_settings(out: str, settings: dict):
    """A study folder keeps one preset and one run length: its first invocation records them in
    study.json, and a later one with other settings is refused (its finished runs would be skipped
    and runs of two lengths mixed in one report)."""
    from config import PRESETS
    path = os.path.join(out, "study.json")
    # no --steps means the preset's: the same length as saying it
    resolved = lambda d: {**d, "steps": d.get("steps") or PRESETS.get(d.get("preset"), {}).get("steps")}
    if os.path.isfile(path):
        old, settings = resolved(rundir.read_json(path)), resolved(settings)
        if diff := [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]:
            raise SystemExit(f"error: {out} holds a study with other settings ({'; '.join(diff)}); "
                             f"use another --out or the same settings")
    else:
        os.makedirs(out, exist_ok=True)
        rundir.atomic_json(path, settings)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="the study's folder [default: study, or study-quick with --quick]")
    ap.add_argument("--quick", action="store_true",
                    help="the main arms on seeds 0,1,2 only (no sweep, no side arms): about 30 minutes")
    ap.add_argument("--seeds", help="seeds of the main arms [default: 0,...,7; 0,1,2 with --quick]")
    ap.add_argument("--side-seeds", help="seeds of the side arms and the capacity sweep [default: the first "
                                         "4 of --seeds]")
    ap.add_argument("--steps", type=int, help="steps per run [default: the organism preset's]")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one CPU thread each [default: 2]")
    ap.add_argument("--arms", help="the arms to run, comma-separated [default: all; with --quick: the main arms]")
    ap.add_argument("--preset", default="organism", help="train.py's preset [default: organism; tiny for a dry run]")
    ap.add_argument("--report-only", action="store_true", help="write the report from the run folders only")
    args = ap.parse_args(argv)
    out = args.out or ("study-quick" if args.quick else "study")
    seeds = parse_seeds(args.seeds or ("0,1,2" if args.quick else "0,1,2,3,4,5,6,7"), "--seeds")
    side = parse_seeds(args.side_seeds, "--side-seeds") if args.side_seeds else seeds[:4]
    if not set(side) <= set(seeds):  # a side run is paired with its seed's uniform run
        raise SystemExit(f"error: --side-seeds {args.side_seeds}: must be among --seeds ({','.join(map(str, seeds))})")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"error: --steps {args.steps}: must be >= 1")
    try:
        rundir.check_out(out)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    import organism
    import study_report
    from config import PRESETS
    if args.preset not in PRESETS:
        raise SystemExit(f"error: --preset {args.preset!r} unknown; allowed: {', '.join(PRESETS)}")
    arms = (args.arms.split(",") if args.arms else
            list(study_report.MAIN if args.quick else study_report.ARMS))
    if unknown := [a for a in arms if a not in study_report.ARMS]:
        raise SystemExit(f"error: --arms: {', '.join(unknown)} unknown; allowed: {', '.join(study_report.ARMS)}")
    if "proportional" in arms or "reduced" in arms:
        arms.append("uniform")  # their profile
    if not args.report_only:
        check_settings(out, {"preset": args.preset, "steps": args.steps})
        if args.preset == "organism":  # built once here, not by two runs at the same time
            try:
                organism.build(log=print)
            except ValueError as e:
                raise SystemExit(f"error: {e}")
        jobs = matrix(out, seeds, side, [] if args.steps is None else ["--steps", str(args.steps)], args.preset, arms)
        t0 = time.perf_counter()
        failed = run_matrix(jobs, out, args.jobs)
        print(f"study: matrix done in {minutes(time.perf_counter() - t0)}" +
              (f"; {len(failed)} failed: " + "; ".join(failed) if failed else ""), flush=True)
    path = study_report.write(out)
    if started := study_report.unfinished(out):  # e.g. --report-only while runs are going, or after a failure
        print(f"study: {len(started)} unfinished run(s) left out of the report: {', '.join(started)}")
    print(f"study: report in {path}")
    if not args.report_only and failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
