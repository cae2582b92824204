"""The study in miniature: the study's whole matrix, run on the CPU model organism, then its report.

    python study.py                          # organism built once, ~31 runs, study/REPORT.md (see README)
    python study.py --seeds 0,1,2,3,4        # more seeds; --steps N for longer runs
    python study.py --report-only            # the report again, from the run folders alone

The matrix (`matrix()`): the base model; GRPO with uniform, proportional and reduced ranks (both from
the same seed's uniform profile), random and dynamic ranks; SFT with uniform ranks, for the regime
comparison; and the scale-policy ablation: uniform and random under rsLoRA, and random under the
constant policy, beside the fixed policy of the main arms. Uniform under `constant` is not run: with
every module at r = r0, alpha/r0 = alpha/r and it is the fixed-policy run, bit for bit. The rsLoRA
arms get alpha/sqrt(r0) as their alpha, so that every policy starts from the same scale at r0 (the
preset's alpha under rsLoRA is a 2.8x larger scale, and those runs collapse: README).

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
import subprocess
import sys
import time
from dataclasses import dataclass

import organism
import rundir
import study_report
from config import PRESETS

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


def matrix(out: str, seeds: list[int], extra: list[str], preset: str = "organism",
           arms=study_report.ARMS) -> list[Job]:
    """Every run of the study (of `arms`), in an order that lets each start as soon as its profile exists."""
    r0, alpha = PRESETS[preset]["rank"], PRESETS[preset]["alpha"]
    # rsLoRA with the preset's alpha would scale every adapter by sqrt(r0) more than the fixed policy at
    # r0 (2.8x at r0 = 8, a higher learning rate in effect); its alpha is set so that all three policies
    # give the same scale at r0 and differ only in how the scale changes with rank, which is the question
    rslora = ["--scale-policy", "rslora", "--alpha", f"{alpha / math.sqrt(r0):.6g}"]
    jobs = [Job("base", None, ["--strategy", "base"])]
    for s in seeds:
        uniform = os.path.join(out, "uniform", f"seed{s}")
        jobs += [Job("uniform", s, ["--strategy", "uniform"]),
                 Job("sft-uniform", s, ["--algo", "sft", "--strategy", "uniform"]),
                 Job("random", s, ["--strategy", "random"]),
                 Job("dynamic", s, ["--strategy", "dynamic"]),
                 Job("uniform-rslora", s, ["--strategy", "uniform", *rslora]),
                 Job("random-rslora", s, ["--strategy", "random", *rslora]),
                 Job("random-constant", s, ["--strategy", "random", "--scale-policy", "constant"]),
                 Job("proportional", s, ["--strategy", "proportional", "--profile", uniform], needs=uniform),
                 Job("reduced", s, ["--strategy", "reduced", "--profile", uniform], needs=uniform)]
    jobs = [j for j in jobs if j.arm in arms]
    for job in jobs:
        seed = [] if job.seed is None else ["--seed", str(job.seed)]
        job.flags = ["--preset", preset, *job.flags, *extra, *seed]
    return sorted(jobs, key=lambda j: j.needs is not None)  # runs that wait for a profile go last


def command(job: Job, out: str) -> list[str]:
    """train.py's command line for this job: a fresh run, or --resume of an unfinished one."""
    run_dir = os.path.join(out, job.dir_name)
    if os.path.isfile(os.path.join(run_dir, rundir.CONFIG)):
        return [sys.executable, os.path.join(HERE, "train.py"), "--resume", run_dir, "--threads", "1"]
    return [sys.executable, os.path.join(HERE, "train.py"), *job.flags, "--threads", "1", "--out", run_dir]


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
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            running.append((job, proc, time.perf_counter(), logf))
        time.sleep(0.2)
    return list(failed.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="study", help="the study's folder [default: study]")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of every GRPO/SFT arm [default: 0,1,2]")
    ap.add_argument("--steps", type=int, help="steps per run [default: the organism preset's]")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one CPU thread each [default: 2]")
    ap.add_argument("--arms", default=",".join(study_report.ARMS), help="the arms to run [default: all]")
    ap.add_argument("--preset", default="organism", help="train.py's preset [default: organism; tiny for a dry run]")
    ap.add_argument("--report-only", action="store_true", help="write the report from the run folders only")
    args = ap.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds {args.seeds!r}: expected comma-separated integers such as 0,1,2")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: must be >= 1")
    arms = args.arms.split(",")
    if unknown := [a for a in arms if a not in study_report.ARMS]:
        raise SystemExit(f"error: --arms: {', '.join(unknown)} unknown; allowed: {', '.join(study_report.ARMS)}")
    if "proportional" in arms or "reduced" in arms:
        arms.append("uniform")  # their profile
    if not args.report_only:
        if args.preset == "organism":  # built once here, not by two runs at the same time
            organism.build(log=print)
        jobs = matrix(args.out, seeds, [] if args.steps is None else ["--steps", str(args.steps)], args.preset, arms)
        t0 = time.perf_counter()
        failed = run_matrix(jobs, args.out, args.jobs)
        print(f"study: matrix done in {minutes(time.perf_counter() - t0)}" +
              (f"; {len(failed)} failed: " + "; ".join(failed) if failed else ""), flush=True)
    path = study_report.write(args.out)
    print(f"study: report in {path}")


if __name__ == "__main__":
    main()
