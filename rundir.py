"""The run folder: the name of every file in it, the one way they are written, and the readers.

    runs/<strategy>-<timestamp>/   (or --out; SFT: runs/sft-<strategy>-<timestamp>/; --seeds: <out>/seed<N>/)
        config.json            every setting, resolved, with the model folder actually used (written
                               last: it makes the folder a run; `train.py --config` runs it again)
        ranks.json             the rank of every module and where it came from
        metrics.jsonl          one line per step: rewards and their spread, the share of groups with
                               equal rewards, completion lengths, truncation, KL, clip fraction,
                               entropy, gradient norm, learning rate, seconds in sampling, scoring
                               and learning
        profile.safetensors    the gradient profile, with profile_summary.json
        eval_<name>.jsonl      one record per evaluated problem, with eval_<name>.json
        adapter/               the adapters in PEFT's format (PeftModel.from_pretrained loads them)
        checkpoint.pt          what --resume needs
        results.json           the run's row of the study's table (written at the very end)
        tiny-model/            --preset tiny only: the model it built

Every file is written to a temporary name and renamed (`atomic_write`), so a crash leaves the previous
version whole. train.py, report.py, profiler.py and allocate.py name these files through this module
only. Readers raise ValueError or OSError naming the file (and line); command lines turn those into
one-line errors.

One writer per run folder: the writing process holds an exclusive lock on <run>/.lock for the run's
life (`hold`); a second train.py on the same folder (a rerun of a killed study beside its orphans, a
--resume typed twice) is refused in one line naming the holder's pid. The kernel drops the lock when
its holder dies, however it dies, so a stale lock never blocks a resume.

Left out: what the files mean (profiler.py, evaluate.py, checkpoint.py); under torchrun only rank 0
writes, and only it holds the lock.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import subprocess

CONFIG = "config.json"
RANKS = "ranks.json"
METRICS = "metrics.jsonl"
PROFILE = "profile.safetensors"
PROFILE_SUMMARY = "profile_summary.json"
ADAPTER = "adapter"
CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
TINY_MODEL = "tiny-model"


def code_version() -> str:
    """The commit this code was checked out at ("+dirty" with uncommitted changes; "unknown" outside git),
    recorded in results.json so that a report can name what made its runs."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def eval_records(name: str) -> str:
    """One evaluation's per-problem records (name: 'final' or 'step<N>')."""
    return f"eval_{name}.jsonl"


def eval_summary(name: str) -> str:
    return f"eval_{name}.json"


# ---------------------------------------------------------------------------------------- writing

def atomic_write(path: str, write):
    """write(tmp) then rename tmp to path: readers see the old file or the new one, never half of one.
    A write that fails (a full disk) removes its half-written tmp and raises; the old file stays."""
    tmp = path + ".tmp"
    try:
        write(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def atomic_json(path: str, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def atomic_lines(path: str, lines):
    """Text lines (each ending in a newline), written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)
    atomic_write(path, write)


def truncate_jsonl(path: str, n: int):
    """Keep the first n lines (a resumed run rewrites what came after its checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()[:n]
    atomic_lines(path, lines)


# ---------------------------------------------------------------------------------------- reading

def read_json(path: str):
    """A JSON file's content; a corrupt file is a ValueError naming the file and the line."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None


def read_metrics(path: str) -> tuple[list[str], bool]:
    """The lines of a metrics.jsonl, each a JSON object, and whether a torn last line (a crash in the
    middle of writing it) was left out. A bad line before the last is a ValueError naming file and line:
    that is damage, not an interrupted append."""
    if not os.path.isfile(path):
        return [], False
    with open(path) as f:  # every line ends in a newline, so that the next step's append starts a line
        lines = [line.rstrip("\n") + "\n" for line in f if line.strip()]
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                return lines[:-1], True
            raise ValueError(f"{path}:{i + 1}: not valid JSON (only the last line can be torn by a crash)") from None
    return lines, False


def count_lines(path: str) -> int:
    """Non-empty lines of a jsonl file (0 when it does not exist)."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def is_finished(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, RESULTS))


LOCK = ".lock"


def hold(run_dir: str):
    """Take the run folder's writer lock (kept until the returned file is closed or the process ends);
    ValueError naming the holder's pid if another process has it."""
    path = os.path.join(run_dir, LOCK)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"{run_dir} is being written by another process (pid {holder}, holding {path}); "
                         f"wait for it or stop it first: one writer per run folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def check_out(run_dir: str):
    """A run folder must be a folder we can create, or an existing folder: not a file, nor under one."""
    path = os.path.abspath(run_dir)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    if path and not os.path.isdir(path):
        raise ValueError(f"--out {run_dir}: {path} is a file, not a folder")


def parse_seeds(text: str) -> list[int]:
    """The seeds a --seeds flag names ("0,1,2"), one seed<N> folder each: distinct, >= 0; ValueError else."""
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{text!r}: expected comma-separated integers such as 0,1,2") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"{text!r}: seeds must be distinct and >= 0 (each is a seed<N> folder)")
    return seeds


def seed_runs(path: str) -> list[str]:
    """The finished seed<N> runs of a --seeds parent folder, by seed."""
    found = glob.glob(os.path.join(path, "seed*", RESULTS))
    seeds = [os.path.dirname(p) for p in found if os.path.basename(os.path.dirname(p))[4:].isdigit()]
    return sorted(seeds, key=lambda d: int(os.path.basename(d)[4:]))


# ------------------------------------------------------------------ the profile behind an allocation

def profile_problem(run_dir: str, algo: str, model: str, preset: str | None) -> str | None:
    """Why `run_dir` cannot provide a gradient profile for an allocation (None when it can): it must be a
    finished uniform run, without a rank pattern, of the same algorithm, model and preset."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        return f"not a run folder (no {CONFIG})"
    try:
        other = read_json(path)
        assert isinstance(other, dict)
    except (OSError, ValueError, AssertionError):
        return f"its {CONFIG} cannot be read"
    if other.get("strategy") != "uniform" or other.get("rank_pattern"):
        pattern = " with a rank pattern" if other.get("rank_pattern") else ""
        return f"a {other.get('strategy')!r} run{pattern}, not a uniform one"
    for name, want in (("algo", algo), ("model", model), ("preset", preset)):
        if other.get(name, "grpo" if name == "algo" else None) != want:
            return f"its {name} is {other.get(name)!r}, this run's {want!r}"
    if not is_finished(run_dir):
        return f"not finished (no {RESULTS})"
    if not os.path.isfile(os.path.join(run_dir, PROFILE_SUMMARY)):
        return f"no gradient profile ({PROFILE_SUMMARY})"
    return None


def newest_profile_run(root: str, algo: str, model: str, preset: str | None) -> str | None:
    """The newest run under root that can provide a profile (see profile_problem); unreadable ones are passed over."""
    found = [(os.path.getmtime(os.path.join(d, RESULTS)), d)
             for d in (os.path.dirname(c) for c in glob.glob(os.path.join(root, "*", CONFIG)))
             if profile_problem(d, algo, model, preset) is None]
    return max(found)[1] if found else None
