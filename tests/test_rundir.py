"""rundir.py: atomic writes, readers that name the file and line, and the profile source's checks."""

import json
import os

import pytest

import rundir as R


def test_a_crash_while_writing_leaves_the_previous_file_whole(tmp_path):
    path = str(tmp_path / "x.json")
    R.atomic_json(path, {"a": 1})

    def dies(tmp):
        with open(tmp, "w") as f:
            f.write('{"a": 2, "b"')  # half written, then the machine "dies"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        R.atomic_write(path, dies)
    assert R.read_json(path) == {"a": 1} and not os.path.exists(path + ".tmp")


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')  # a crash while appending step 3
    assert R.read_metrics(str(path)) == (['{"step": 1}\n', '{"step": 2}\n'], True)
    path.write_text('{"step": 1}\n{"step": 2}')  # whole, but its newline lost: given back, so appends start a line
    assert R.read_metrics(str(path)) == (['{"step": 1}\n', '{"step": 2}\n'], False)
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # damage, not an interrupted append
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        R.read_metrics(str(path))


def test_readers_name_the_file_and_the_line(tmp_path):
    (tmp_path / "bad.json").write_text('{\n  "a": 1,,\n}')
    with pytest.raises(ValueError, match=r"bad\.json:2: not valid JSON"):
        R.read_json(str(tmp_path / "bad.json"))
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"step": 2}\n\n{"step": 3}\n')
    assert R.count_lines(str(tmp_path / "m.jsonl")) == 3 and R.count_lines(str(tmp_path / "none.jsonl")) == 0
    R.truncate_jsonl(str(tmp_path / "m.jsonl"), 2)
    assert [json.loads(line)["step"] for line in open(tmp_path / "m.jsonl")] == [1, 2]


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    for out in ("f", "f/run", "f/a/b"):
        with pytest.raises(ValueError, match="is a file, not a folder"):
            R.check_out(str(tmp_path / out))
    R.check_out(str(tmp_path / "new" / "run"))  # a folder to be created is fine


def write_run(folder, finished=True, summary=True, **config):
    folder.mkdir(parents=True)
    R.atomic_json(str(folder / R.CONFIG), {"strategy": "uniform", "algo": "grpo", "model": "m", "preset": None,
                                           "rank_pattern": None, **config})
    if finished:
        R.atomic_json(str(folder / R.RESULTS), {"steps": 3})
    if summary:
        R.atomic_json(str(folder / R.PROFILE_SUMMARY), {})
    return str(folder)


def test_the_profile_source_must_be_a_finished_uniform_run_of_the_same_kind(tmp_path):
    ok = write_run(tmp_path / "runs" / "ok")
    assert R.profile_problem(ok, "grpo", "m", None) is None
    cases = {
        "random": (dict(strategy="random"), "a 'random' run"),
        "pattern": (dict(rank_pattern="p.json"), "with a rank pattern"),
        "sft": (dict(algo="sft"), "its algo is 'sft'"),
        "other": (dict(model="other"), "its model is 'other'"),
        "tiny": (dict(preset="tiny"), "its preset is 'tiny'"),
    }
    for name, (config, why) in cases.items():
        assert why in R.profile_problem(write_run(tmp_path / "runs" / name, **config), "grpo", "m", None)
    assert "not finished" in R.profile_problem(write_run(tmp_path / "runs" / "running", finished=False),
                                               "grpo", "m", None)
    assert "no gradient profile" in R.profile_problem(write_run(tmp_path / "runs" / "noprof", summary=False),
                                                      "grpo", "m", None)
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / R.CONFIG).write_text("{oops")
    assert "cannot be read" in R.profile_problem(str(tmp_path / "runs" / "broken"), "grpo", "m", None)
    newer = write_run(tmp_path / "runs" / "newer")
    os.utime(os.path.join(newer, R.RESULTS), (2e9, 2e9))
    assert R.newest_profile_run(str(tmp_path / "runs"), "grpo", "m", None) == newer
    assert R.newest_profile_run(str(tmp_path / "runs"), "sft", "m", None).endswith("sft")  # the SFT run, for SFT
    assert R.newest_profile_run(str(tmp_path / "runs"), "grpo", "zzz", None) is None


def test_seed_runs_are_found_in_seed_order(tmp_path):
    for seed in (10, 2, 1):
        write_run(tmp_path / "p" / f"seed{seed}")
    write_run(tmp_path / "p" / "seed3", finished=False)
    (tmp_path / "p" / "seedx").mkdir()
    assert [os.path.basename(d) for d in R.seed_runs(str(tmp_path / "p"))] == ["seed1", "seed2", "seed10"]


def test_one_writer_per_run_folder(tmp_path):
    """hold() is exclusive across processes, names the holder's pid, and dies with its holder."""
    import subprocess
    import sys
    from conftest import ROOT
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import rundir; f = rundir.hold(sys.argv[2]); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, ROOT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"another process .pid {holder.pid}, holding"):
            R.hold(str(tmp_path))
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock anyway
        holder.wait()
    f = R.hold(str(tmp_path))
    assert (tmp_path / R.LOCK).read_text() == f"{os.getpid()}\n"
    f.close()
