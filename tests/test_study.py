"""study.py and study_report.py on the tiny preset: the matrix runs, a killed study resumes, and the
report is built from the run folders alone."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import study
import study_report
from conftest import ROOT

ARMS = "base,uniform,proportional,random-rslora,sft-uniform"


def study_cmd(out, *extra):
    return [sys.executable, os.path.join(ROOT, "study.py"), "--preset", "tiny", "--seeds", "0", "--arms", ARMS,
            "--steps", "4", "--out", str(out), *extra]


def test_the_matrix_has_every_arm_and_its_dependencies():
    jobs = study.matrix("s", [0, 1, 2], [0, 1], [], preset="tiny")
    names = [j.dir_name for j in jobs]
    main, side = len(study_report.MAIN) - 1, len(study_report.SIDE) + len(study_report.SWEEP)
    assert len(jobs) == 1 + main * 3 + side * 2 and len(set(names)) == len(names)
    assert {j.arm for j in jobs} == set(study_report.ARMS) and "uniform-rslora" not in study_report.ARMS
    for j in jobs:
        assert j.flags[:2] == ["--preset", "tiny"]
        if j.arm in ("proportional", "reduced"):  # from the same seed's uniform profile, scheduled after it
            assert j.needs == os.path.join("s", "uniform", f"seed{j.seed}") and j.needs in " ".join(j.flags)
            assert names.index(j.dir_name) > names.index(f"uniform{os.sep}seed{j.seed}")
        if j.arm in study_report.SIDE + study_report.SWEEP:
            assert j.seed in (0, 1)
        if (rank := study_report.sweep_rank(j.arm)) and j.arm in study_report.SWEEP:
            regime, r = rank
            assert j.flags[j.flags.index("--rank") + 1] == str(r) and ("--algo" in j.flags) == (regime == "sft")
    quick = [j for j in jobs if j.arm in study_report.MAIN]  # the quick study's runs come first
    assert jobs[:len(quick)] == quick and jobs[len(quick)].arm in study_report.SWEEP
    assert "--scale-policy" not in " ".join(next(j for j in jobs if j.arm == "uniform").flags)
    rslora = next(j for j in jobs if j.arm == "random-rslora").flags
    alpha = float(rslora[rslora.index("--alpha") + 1])  # the fixed policy's scale at r0, to the last bit
    assert alpha / math.sqrt(study_report.R0) == pytest.approx(16.0 / study_report.R0, rel=1e-15)


def test_a_study_folder_keeps_its_settings(tmp_path):
    study.check_settings(str(tmp_path / "s"), {"preset": "tiny", "steps": 4})
    study.check_settings(str(tmp_path / "s"), {"preset": "tiny", "steps": 4})  # the same: fine
    with pytest.raises(SystemExit, match="steps: 4 there, 6 now"):
        study.check_settings(str(tmp_path / "s"), {"preset": "tiny", "steps": 6})
    study.check_settings(str(tmp_path / "t"), {"preset": "tiny", "steps": None})  # the preset's 12 steps
    study.check_settings(str(tmp_path / "t"), {"preset": "tiny", "steps": 12})
    for bad, why in ((["--seeds", "0,0"], "distinct"), (["--seeds", "a"], "comma-separated"),
                     (["--steps", "-1"], "must be >= 1"), (["--preset", "nosuch"], "unknown"),
                     (["--seeds", "0,1", "--side-seeds", "2"], "must be among --seeds"),
                     (["--arms", "uniform,nosuch"], "nosuch unknown"), (["--jobs", "0"], "must be >= 1")):
        with pytest.raises(SystemExit, match=why):
            study.main(["--out", str(tmp_path / "x"), *bad])
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="afile is a file, not a folder"):
        study.main(["--out", str(tmp_path / "afile")])


def test_a_typo_is_refused_before_torch_is_imported():
    """study.py's own checks come before the imports that bring torch (25 s on a busy machine)."""
    code = ("import sys, study\ntry:\n    study.main(['--seeds', '0,0'])\nexcept SystemExit as e:\n"
            "    print(e, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "error: --seeds '0,0': seeds must be distinct and >= 0 (each is a seed<N> folder) False"


@pytest.mark.slow
def test_a_killed_study_resumes_and_skips_finished_runs_then_reports(tmp_path):
    out = tmp_path / "study"
    # 8 steps: the tiny preset's checkpoint at step 4 lets the kill land in a run with a checkpoint
    proc = subprocess.Popen(study_cmd(out, "--jobs", "1", "--steps", "8"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240

    def mid_run():  # a run finished, and another one past its first checkpoint but not finished
        started = [p.parent for p in out.glob("*/seed0/config.json")]
        return any((d / "results.json").exists() for d in started) and \
            any(not (d / "results.json").exists() and (d / "checkpoint.pt").exists() for d in started)

    while not mid_run():
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its running train.py, as a power cut would
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("**/results.json")}
    assert 1 <= len(finished) < 5
    unfinished = [p.parent for p in out.glob("*/seed0/config.json") if not (p.parent / "results.json").exists()]
    assert unfinished  # the next invocation must --resume it (a fresh start would be refused)
    resumed = next(d for d in unfinished if (d / "checkpoint.pt").exists())
    logged = (resumed / "metrics.jsonl").read_text().splitlines()[:4]  # the steps the checkpoint holds
    p = subprocess.run(study_cmd(out, "--report-only"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    named = ", ".join(sorted(str(d.relative_to(out)) for d in unfinished))  # left out, and said so
    assert p.returncode == 0 and f"unfinished run(s) left out of the report: {named}" in p.stdout, p.stdout + p.stderr
    assert f"unfinished runs left out: {named}" in (out / "REPORT.md").read_text()
    p = subprocess.run(study_cmd(out, "--jobs", "2", "--steps", "8"), cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    # resumed from its checkpoint, not restarted: the first 4 lines (their times too) are the ones written before
    assert (resumed / "metrics.jsonl").read_text().splitlines()[:4] == logged and len(logged) == 4
    assert f"{len(finished)} of 5 runs already finished (skipped)" in p.stdout and "unfinished" not in p.stdout
    assert "run 5 of 5 done" in p.stdout and "failed" not in p.stdout.lower()
    assert all(path.stat().st_mtime_ns == t for path, t in finished.items())  # untouched
    for arm in ("uniform", "proportional", "random-rslora", "sft-uniform"):
        assert (out / arm / "seed0" / "results.json").exists()
    report = (out / "REPORT.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    for arm in ("base", "uniform", "proportional", "random-rslora", "sft-uniform"):
        assert f"| {arm} |" in report
    assert set(summary["accuracy"]) == {"base", "uniform", "proportional", "random-rslora", "sft-uniform"}
    acc = {arm: 100 * json.loads((out / arm / ("" if arm == "base" else "seed0") / "results.json").read_text())
           ["accuracy"] for arm in summary["accuracy"]}  # the numbers, from the run folders themselves
    for arm, row in summary["accuracy"].items():
        assert row["accuracy"] == pytest.approx([acc[arm]]) and row["mean"] == pytest.approx(acc[arm])
    prop = summary["accuracy"]["proportional"]["vs"]
    assert prop["against"] == "uniform" and prop["per_seed"]["0"] == pytest.approx(acc["proportional"] - acc["uniform"])
    assert summary["accuracy"]["sft-uniform"]["vs"]["per_seed"]["0"] == pytest.approx(acc["sft-uniform"] - acc["uniform"])
    assert "proportional/raw" in summary["amplification"] and "sft-uniform/over training" in summary["flatness"]
    import shutil  # the report needs the run folders alone: a copy without the logs gives the same report
    for arm in summary["accuracy"]:
        shutil.copytree(out / arm, tmp_path / "copy" / arm)
    assert open(study_report.write(str(tmp_path / "copy"))).read() == report
    with pytest.raises(SystemExit, match="no finished run"):
        study_report.write(str(tmp_path / "empty"))
    pytest.importorskip("matplotlib")
    for name in ("capacity.png", "shares.png", "amplification.png", "curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and f"]({name})" in report


def test_a_killed_study_takes_its_runs_with_it(tmp_path):
    """SIGKILL on study.py alone (not its process group): its running train.py dies too, instead of
    writing on beside a rerun."""
    proc = subprocess.Popen(study_cmd(tmp_path / "study", "--jobs", "1", "--steps", "400"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # runs that outlast the wait
    deadline = time.time() + 240
    locks = []
    while not locks:
        assert time.time() < deadline and proc.poll() is None
        locks = [p for p in (tmp_path / "study").glob("*/seed0/.lock") if p.read_text().strip()]
        time.sleep(0.05)
    child = int(locks[0].read_text())
    proc.kill()
    proc.wait()
    for _ in range(200):  # the child gets SIGTERM from the kernel
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError(f"train.py {child} outlived its study")


def test_an_allocation_waits_for_its_profile_even_with_two_jobs(tmp_path, monkeypatch):
    """From scratch with --jobs 2, proportional and reduced start only after their uniform run finished
    (fake runs that record when they start and end; uniform is the slowest)."""
    out = str(tmp_path / "s")
    script = ("import json, os, sys, time; d = sys.argv[1]; os.makedirs(d, exist_ok=True)\n"
              "start = time.time(); time.sleep(1.0 if '/uniform/' in d + '/' else 0.1)\n"
              "json.dump({'start': start, 'end': time.time()}, open(os.path.join(d, 'results.json'), 'w'))")
    monkeypatch.setattr(study, "command", lambda job, out: [sys.executable, "-c", script, os.path.join(out, job.dir_name)])
    jobs = study.matrix(out, [0], [], [], preset="tiny", arms=["uniform", "proportional", "reduced", "random"])
    assert study.run_matrix(jobs, out, parallel=2, log=lambda msg: None) == []
    times = {j.arm: json.load(open(os.path.join(out, j.dir_name, "results.json"))) for j in jobs}
    assert times["proportional"]["start"] >= times["uniform"]["end"] <= times["reduced"]["start"]
    assert times["random"]["start"] < times["uniform"]["end"]  # the second job did not idle meanwhile
