"""train.py end to end through its real entry point (subprocesses), on the offline tiny preset."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

TRAIN = os.path.join(ROOT, "train.py")


def run(args, cwd, ok=True, env=None):
    p = subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=None if env is None else {**os.environ, **env})
    if ok:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study: uniform first, then the arms that follow from its profile."""
    cwd = tmp_path_factory.mktemp("study")
    run(["--preset", "tiny", "--strategy", "uniform", "--out", "runs/uniform"], cwd)
    for s in ("proportional", "reduced", "random", "base"):
        run(["--preset", "tiny", "--strategy", s, "--out", f"runs/{s}"], cwd)
    return cwd


def load(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_every_strategy_produces_a_complete_run_folder(study):
    for s in ("uniform", "proportional", "reduced", "random"):
        d = study / "runs" / s
        for name in ("config.json", "ranks.json", "metrics.jsonl", "profile.safetensors", "profile_summary.json",
                     "eval_final.jsonl", "eval_step6.jsonl", "adapter/adapter_config.json",
                     "adapter/adapter_model.safetensors", "checkpoint.pt", "results.json"):
            assert (d / name).exists(), (s, name)
        res = load(d / "results.json")
        assert res["strategy"] == s and res["steps"] == 12 and res["n"] == 32
        metrics = [json.loads(line) for line in open(d / "metrics.jsonl")]
        assert [m["step"] for m in metrics] == list(range(1, 13))
        layer_ranks = load(d / "ranks.json")["layer_ranks"]
        assert sum(layer_ranks) == (round(0.7 * 32) if s == "reduced" else 32)
    assert load(study / "runs/proportional/ranks.json")["profile"] == "runs/uniform"  # found by itself
    assert load(study / "runs/uniform/config.json")["threads"] == 1  # the tiny preset's default, saved
    base = load(study / "runs/base/results.json")
    assert base["lora_params"] == 0 and not (study / "runs/base/adapter").exists()


@pytest.mark.slow
def test_table_matches_results(study):
    dirs = [str(study / "runs" / s) for s in ("uniform", "proportional", "reduced", "random", "base")]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), *dirs], cwd=study, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for d in dirs:
        r = load(os.path.join(d, "results.json"))
        line = next(line for line in out.splitlines() if line.startswith(r["strategy"] + " "))
        assert f"{100 * r['accuracy']:.1f}% ({100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f})" in line
        assert f"{100 * r['format_rate']:.1f}%" in line
    assert "max/min" in out and any(line.split()[:3] == ["proportional", "grpo", "fixed"] for line in out.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["uniform", "dynamic", "uniform-dropout"])
def test_resume_equals_uninterrupted(tmp_path, strategy):
    """Dropout draws from torch's global RNG after the resume point, so its variant fails unless the
    checkpoint restores that RNG's state."""
    common = ["--preset", "tiny", "--steps", "8", "--checkpoint-every", "2", "--eval-every", "0",
              "--strategy", strategy.split("-")[0], *(["--dropout", "0.1"] if "dropout" in strategy else [])]
    run([*common, "--out", "runs/whole"], tmp_path)
    run([*common, "--out", "runs/parts", "--stop-after", "3"], tmp_path)
    assert len(open(tmp_path / "runs/parts/metrics.jsonl").readlines()) == 3
    run(["--resume", "runs/parts", "--stop-after", "2"], tmp_path)
    run(["--resume", "runs/parts"], tmp_path)
    from safetensors.torch import load_file
    a = load_file(tmp_path / "runs/whole/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "runs/parts/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on the CPU
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.startswith("time")}
    ma = [strip(line) for line in open(tmp_path / "runs/whole/metrics.jsonl")]
    mb = [strip(line) for line in open(tmp_path / "runs/parts/metrics.jsonl")]
    assert ma == mb and len(ma) == 8
    pa, pb = (load_file(tmp_path / f"runs/{n}/profile.safetensors") for n in ("whole", "parts"))
    assert torch.equal(pa["grad_norms"], pb["grad_norms"]) and pa["grad_norms"].shape[0] == 8
    ra, rb = load(tmp_path / "runs/whole/results.json"), load(tmp_path / "runs/parts/results.json")
    assert ra["accuracy"] == rb["accuracy"]
    if strategy == "dynamic":  # ranks moved at steps 3 and 6, identically in both runs
        assert torch.equal(pa["ranks"], pb["ranks"]) and not torch.equal(pa["ranks"][0], pa["ranks"][-1])
        assert ra["final_layer_ranks"] == rb["final_layer_ranks"] and sum(ra["final_layer_ranks"]) == 32


@pytest.mark.slow
def test_clear_errors(tmp_path):
    cases = [
        (["--preset", "tiny", "--strategy", "adaptive"], "unknown; allowed: base, uniform"),
        (["--preset", "tiny", "--algo", "ppo"], "--algo 'ppo' unknown"),
        (["--preset", "tiny", "--compile", "yes"], "--compile 'yes' unknown; allowed: auto, on, off"),
        (["--preset", "tiny", "--seeds", "0,x"], "expected comma-separated integers"),
        (["--preset", "tiny", "--threads", "0"], "--threads 0: must be >= 1"),
        (["--preset", "tiny", "--strategy", "proportional"], "Run `python train.py --preset tiny --strategy uniform`"),
        (["--preset", "tiny", "--rank-pattern", "missing.json"], "missing.json"),
        (["--preset", "tiny", "--rank-pattern", "bad.json"], "bad.json:2: not valid JSON"),
        (["--preset", "tiny", "--rank-pattern", "nomatch.json"], "matches no targeted module"),
        (["--model", str(tmp_path / "nowhere"), "--device", "cpu"], "cannot load model"),
        (["--model", str(tmp_path / "empty"), "--device", "cpu"], "config.json"),
    ]
    cases += [(["--preset", "tiny", flag, "0"], f"{flag} 0: must be >= 1")
              for flag in ("--steps", "--prompts-per-step", "--micro-batch", "--checkpoint-every", "--rank",
                           "--eval-n", "--threads", "--eval-batch")]
    cases += [
        (["--preset", "tiny", "--steps", "-3"], "--steps -3: must be >= 1"),
        (["--preset", "tiny", "--strategy", "random", "--r-min", "20"], "bounds must satisfy 0 <= r_min <= r_max"),
        (["--preset", "tiny", "--num-generations", "1"], "needs at least 2"),
        (["--preset", "tiny", "--data", "nowhere"], "--data with --preset tiny"),
        (["--preset", "tiny", "--model", "Qwen/Qwen2.5-0.5B"], "--model with --preset tiny"),
        (["--preset", "tiny", "--rank-pattern", "zeros.json", "--out", "runs/z"], "every module has rank 0"),
        (["--preset", "tiny", "--rank-pattern", "huge.json", "--out", "runs/h"], "exceeds its smaller dimension 32"),
        (["--preset", "tiny", "--out", "afile"], "afile is a file"),
        (["--preset", "tiny", "--out", "afile/run"], "afile is a file"),
        (["--preset", "tiny", "--config", "bad.json"], "bad.json:2: not valid JSON"),
        (["--resume", "bad_run"], "config.json:1: not valid JSON"),
        (["--preset", "tiny", "--config", "typed.json"], 'typed.json: lr is "fast"; expected float'),
        (["--preset", "tiny", "--config", "typo.json"], "typo.json: unknown setting(s) lrr; the settings are"),
        (["--preset", "tiny", "--seeds", "0,0"], "--seeds '0,0': seeds must be distinct and >= 0"),
        (["--preset", "tiny", "--device", "tpu"], "--device 'tpu' unknown; allowed: cpu, cuda"),
        (["--preset", "tiny", "--dtype", "fp16"], "--dtype 'fp16' unknown; allowed: bf16, fp32"),
        (["--device", "cpu", "--data", "nodata"], "nodata: no such file"),
        (["--device", "cpu", "--data", "emptydata", "--data-unverified"], "train.jsonl: no problems"),
        (["--device", "cpu", "--data", "emptydata"], "is not the GSM8K train release's"),
        (["--device", "cpu", "--data", "baddata", "--data-unverified"], "baddata/train.jsonl:2: malformed"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--preset", "tiny", "--device", "cuda"], "--device cuda: PyTorch"))
    (tmp_path / "typed.json").write_text(json.dumps({"lr": "fast"}))
    (tmp_path / "typo.json").write_text(json.dumps({"lrr": 0.1}))
    (tmp_path / "zeros.json").write_text(json.dumps({"model.layers.*": 0}))
    (tmp_path / "huge.json").write_text(json.dumps({"model.layers.0.self_attn.k_proj": 100000}))
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "bad_run").mkdir()
    (tmp_path / "bad_run" / "config.json").write_text("{oops")
    for name, text in (("emptydata", ""), ("baddata", '{"question": "q", "answer": "a #### 3"}\n{oops\n')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_text(text)
        (tmp_path / name / "test.jsonl").write_text(text)
    (tmp_path / "bad.json").write_text('{\n  "model.layers.0.mlp.up_proj": 4,,\n}')
    (tmp_path / "nomatch.json").write_text('{"model.layers.99.mlp.up_proj": 4}')
    (tmp_path / "empty").mkdir()
    before = sorted(os.listdir(tmp_path))
    for args, expected in cases:
        p = run(args, tmp_path, ok=False)
        assert p.returncode != 0, args
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], (args, p.stderr[-500:])
        assert sorted(os.listdir(tmp_path)) == before, args  # nothing created: no runs/, no half-written folder


def test_rank_pattern_file_is_used(tmp_path):
    pattern = {f"model.layers.{i}.{m}": 4 + i for i in range(4)
               for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    (tmp_path / "p.json").write_text(json.dumps(pattern))
    run(["--preset", "tiny", "--rank-pattern", "p.json", "--steps", "2", "--out", "runs/p"], tmp_path)
    cfg = load(tmp_path / "runs/p/adapter/adapter_config.json")
    assert cfg["r"] == 8 and len(cfg["rank_pattern"]) == 28
    res = load(tmp_path / "runs/p/results.json")
    assert (res["rank_min"], res["rank_max"]) == (4, 7) and res["strategy"] == "pattern:p.json"


@pytest.mark.slow
def test_sft_regime_and_seeds_land_in_the_same_report(tmp_path):
    run(["--preset", "tiny", "--algo", "sft", "--steps", "4", "--out", "runs/sft"], tmp_path)
    run(["--preset", "tiny", "--steps", "3", "--seeds", "0,1", "--out", "runs/grpo"], tmp_path)
    res = load(tmp_path / "runs/sft/results.json")
    assert res["algo"] == "sft" and res["steps"] == 4
    assert all(json.loads(line)["tokens"] > 0 for line in open(tmp_path / "runs/sft/metrics.jsonl"))
    assert [load(tmp_path / f"runs/grpo/seed{s}/results.json")["seed"] for s in (0, 1)] == [0, 1]
    dirs = ["runs/sft", "runs/grpo/seed0", "runs/grpo/seed1"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), *dirs], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "sft:uniform" in p.stdout and "Across seeds" in p.stdout
    stats = p.stdout.split("Gradient statistics")[1].splitlines()
    assert {line.split()[0] for line in stats if line.split()} >= {"sft", "grpo/seed0", "grpo/seed1"}  # by folder
    assert any(line.split()[:3] == ["sft", "sft", "fixed"] for line in stats)  # algo and scale policy named
    # every seed is evaluated on the same problems (the subset does not follow the training seed)
    idx = [[json.loads(line)["index"] for line in open(tmp_path / f"runs/grpo/seed{s}/eval_final.jsonl")]
           for s in (0, 1)]
    assert idx[0] == idx[1] and len(idx[0]) == 32
    p = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), "--compare", *dirs[1:]], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "McNemar exact p" in p.stdout, p.stderr


def test_saved_config_reproduces_the_run(tmp_path):
    from safetensors.torch import load_file
    run(["--preset", "tiny", "--steps", "3", "--eval-n", "4", "--eval-every", "0", "--out", "runs/a"], tmp_path)
    run(["--config", "runs/a/config.json", "--out", "runs/b"], tmp_path)
    a = load_file(tmp_path / "runs/a/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "runs/b/adapter/adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load(tmp_path / "runs/b/config.json")["steps"] == 3


def test_a_failed_checkpoint_write_is_one_line_and_leaves_the_previous_one(tmp_path, monkeypatch):
    import train
    common = ["--preset", "tiny", "--steps", "8", "--eval-every", "0", "--checkpoint-every", "2"]
    run([*common, "--out", "runs/c", "--stop-after", "2"], tmp_path)
    ckpt = tmp_path / "runs/c/checkpoint.pt"
    before = ckpt.read_bytes()

    def crash_while_writing(obj, path):
        with open(path, "wb") as f:
            f.write(before[:100])  # half a file, then the machine "dies"
        raise OSError("disk full")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "save", crash_while_writing)
    with pytest.raises(SystemExit, match=r"cannot write the checkpoint \(or profile\) in runs/c at step 4 \(disk full; "
                                         r"a full disk\?\); the previous checkpoint is intact: free space, then "
                                         r"--resume runs/c"):
        train.main(["--resume", "runs/c"])
    monkeypatch.undo()
    assert ckpt.read_bytes() == before and torch.load(ckpt, weights_only=False)["step"] == 2
    assert not os.path.exists(f"{ckpt}.tmp")  # the half-written file is not left behind
    run(["--resume", "runs/c"], tmp_path)  # and the run goes on from step 2


def test_ctrl_c_writes_a_checkpoint(tmp_path):
    import signal
    p = subprocess.Popen([sys.executable, TRAIN, "--preset", "tiny", "--steps", "500", "--eval-every", "0",
                          "--checkpoint-every", "1000", "--out", "runs/i"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step    3/"):
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted: checkpoint at step" in out
    step = torch.load(tmp_path / "runs/i/checkpoint.pt", weights_only=False)["step"]
    assert 3 <= step < 500
    assert len(open(tmp_path / "runs/i/metrics.jsonl").readlines()) == step


def test_every_command_line_prints_its_help():
    for script in ("train.py", "allocate.py", "profiler.py", "report.py", "bench.py", "plan.py", "study.py"):
        p = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0 and "usage:" in p.stdout, (script, p.stderr[-1000:])
    p = subprocess.run([sys.executable, TRAIN, "--help"], capture_output=True, text=True, timeout=120)
    for flag in ("--strategy", "--algo", "--seeds", "--config", "--resume", "--dynamic-every", "--stop-after"):
        assert flag in p.stdout


@pytest.mark.slow
def test_compiled_decoding_trains_identically(tmp_path):
    """--compile on (the default on CUDA) samples and evaluates exactly as eager decoding does. The sampler's
    log-probs differ at rounding level between the two (fused kernels), and with them the importance
    weights, so the bit-for-bit comparison of the adapters runs without the correction (--is-cap 0)."""
    from safetensors.torch import load_file
    args = ["--preset", "tiny", "--steps", "3", "--eval-n", "8", "--eval-every", "0", "--is-cap", "0"]
    run([*args, "--compile", "off", "--out", "runs/eager"], tmp_path)
    run([*args, "--compile", "on", "--out", "runs/compiled"], tmp_path)
    a = load_file(tmp_path / "runs/eager/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "runs/compiled/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = [json.loads(line)["completion"] for line in open(tmp_path / "runs/eager/eval_final.jsonl")]
    eb = [json.loads(line)["completion"] for line in open(tmp_path / "runs/compiled/eval_final.jsonl")]
    assert ea == eb


def test_a_checkpoint_is_data_not_code(tmp_path):
    """A checkpoint.pt carrying a pickled object (here one that would create a file when unpickled) is
    refused with one line, and its code never runs; so is a truncated file."""
    run(["--preset", "tiny", "--steps", "4", "--stop-after", "2", "--checkpoint-every", "2", "--out", "runs/r"],
        tmp_path)
    ckpt = tmp_path / "runs/r/checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)  # what train.py writes loads as data
    marker = tmp_path / "PWNED"
    state["payload"] = Payload(str(marker))
    torch.save(state, ckpt)
    p = run(["--resume", "runs/r"], tmp_path, ok=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode != 0 and err[-1].startswith("error:") and "checkpoint.pt: not a checkpoint" in err[-1], p.stderr
    assert not marker.exists()
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    p = run(["--resume", "runs/r"], tmp_path, ok=False)
    assert p.returncode != 0 and "not a checkpoint this program can load" in p.stderr.strip().splitlines()[-1]


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------- nothing lost, nothing silent (issue 18)

def metrics_of(folder):
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


@pytest.mark.slow
def test_resume_reconciles_every_file_with_the_checkpoint(tmp_path):
    common = ["--preset", "tiny", "--steps", "6", "--eval-every", "0", "--checkpoint-every", "2"]
    run([*common, "--out", "runs/whole"], tmp_path)
    # a crash before the first checkpoint (or a deleted checkpoint.pt): start again at step 0, nothing counted twice
    run([*common, "--out", "runs/nockpt", "--stop-after", "3"], tmp_path)
    (tmp_path / "runs/nockpt/checkpoint.pt").unlink()
    p = run(["--resume", "runs/nockpt"], tmp_path)
    assert "starting again at step 0 (the 3 steps logged before are discarded)" in p.stdout
    m = metrics_of(tmp_path / "runs/nockpt")
    assert [x["step"] for x in m] == list(range(1, 7))
    res, whole = load(tmp_path / "runs/nockpt/results.json"), load(tmp_path / "runs/whole/results.json")
    assert res["train_tokens"] == sum(x["tokens"] for x in m) == whole["train_tokens"]
    # metrics.jsonl lost: steps would vanish silently, so the resume is refused, saying what is missing
    run([*common, "--out", "runs/nometrics", "--stop-after", "2"], tmp_path)
    (tmp_path / "runs/nometrics/metrics.jsonl").unlink()
    p = run(["--resume", "runs/nometrics"], tmp_path, ok=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "metrics.jsonl holds 0 of the checkpoint's 2 steps" in last, p.stderr[-1000:]
    # a crash while appending a line past the checkpoint: the torn line is dropped with a note, the step recomputed
    run([*common, "--out", "runs/torn", "--stop-after", "2"], tmp_path)
    with open(tmp_path / "runs/torn/metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    p = run(["--resume", "runs/torn"], tmp_path)
    assert "its last line was torn (a crash while it was written) and is dropped" in p.stdout
    assert [x["step"] for x in metrics_of(tmp_path / "runs/torn")] == list(range(1, 7))
    assert load(tmp_path / "runs/torn/results.json")["train_tokens"] == whole["train_tokens"]
    # torn inside the checkpoint's steps: that step's line is lost, which the resume says instead of hiding it
    run([*common, "--out", "runs/torn2", "--stop-after", "2"], tmp_path)
    text = (tmp_path / "runs/torn2/metrics.jsonl").read_text()
    (tmp_path / "runs/torn2/metrics.jsonl").write_text(text[:-20])
    p = run(["--resume", "runs/torn2"], tmp_path, ok=False)
    assert "metrics.jsonl holds 1 of the checkpoint's 2 steps" in p.stderr.strip().splitlines()[-1]
    # a corrupt profile: one line
    run([*common, "--out", "runs/badprofile", "--stop-after", "2"], tmp_path)
    (tmp_path / "runs/badprofile/profile.safetensors").write_bytes(b"garbage")
    p = run(["--resume", "runs/badprofile"], tmp_path, ok=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "profile.safetensors cannot be read" in last and "Traceback" not in p.stderr


@pytest.mark.slow
def test_resume_applies_the_flags_that_may_change_and_refuses_the_others(tmp_path):
    common = ["--preset", "tiny", "--steps", "3", "--eval-every", "0", "--eval-n", "8"]
    run([*common, "--out", "runs/r"], tmp_path)
    results = (tmp_path / "runs/r/results.json").read_bytes()
    p = run(["--resume", "runs/r"], tmp_path)  # finished: said, and nothing is touched
    assert "is finished (3 of 3 steps" in p.stdout and (tmp_path / "runs/r/results.json").read_bytes() == results
    p = run(["--resume", "runs/r", "--steps", "5", "--lr", "0.5"], tmp_path, ok=False)
    last = p.stderr.strip().splitlines()[-1]
    assert "--lr (the run has 0.002) cannot change when resuming" in last and "--steps" in last
    p = run(["--resume", "runs/r", "--seed", "1"], tmp_path, ok=False)
    assert "--seed (the run has 0) cannot change when resuming" in p.stderr.strip().splitlines()[-1]
    # fewer steps than the run has done: refused (it would end at its step while config.json said otherwise)
    run([*common, "--out", "runs/s", "--stop-after", "2", "--checkpoint-every", "1"], tmp_path)
    p = run(["--resume", "runs/s", "--steps", "1"], tmp_path, ok=False)
    assert "--steps 1: runs/s is already at step 2 (checkpoint.pt); a run cannot be shortened" in p.stderr
    assert load(tmp_path / "runs/s/config.json")["steps"] == 3
    # a resumed config is checked like a new one: a bad value in config.json is one line
    saved = load(tmp_path / "runs/s/config.json")
    (tmp_path / "runs/s/config.json").write_text(json.dumps({**saved, "micro_batch": 0}))
    p = run(["--resume", "runs/s"], tmp_path, ok=False)
    assert p.stderr.strip().splitlines()[-1] == "error: --micro-batch 0: must be >= 1"
    run(["--resume", "runs/r", "--steps", "5"], tmp_path)  # more steps: applied and saved
    assert load(tmp_path / "runs/r/config.json")["steps"] == 5 and load(tmp_path / "runs/r/results.json")["steps"] == 5
    assert [x["step"] for x in metrics_of(tmp_path / "runs/r")] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_the_profile_source_is_checked_named_and_saved(tmp_path):
    common = ["--preset", "tiny", "--steps", "2", "--eval-every", "0", "--eval-n", "8"]
    run([*common, "--algo", "sft", "--out", "runs/sft"], tmp_path)
    run([*common, "--strategy", "random", "--out", "runs/random"], tmp_path)
    for src, why in (("runs/sft", "its algo is 'sft'"), ("runs/random", "a 'random' run")):
        p = run([*common, "--strategy", "proportional", "--profile", src, "--out", "runs/p"], tmp_path, ok=False)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode != 0 and why in last and "--any-profile" in last, p.stderr[-800:]
        assert not (tmp_path / "runs/p").exists()
    p = run([*common, "--strategy", "proportional", "--out", "runs/p"], tmp_path, ok=False)  # none fits
    assert "needs the gradient profile of a finished uniform run" in p.stderr.strip().splitlines()[-1]
    run([*common, "--out", "runs/uniform"], tmp_path)
    (tmp_path / "runs/broken").mkdir()
    (tmp_path / "runs/broken/config.json").write_text("{not json")  # must not crash the search
    p = run([*common, "--strategy", "reduced", "--out", "runs/red"], tmp_path)
    assert "profile from runs/uniform (the newest finished uniform grpo run" in p.stdout
    assert load(tmp_path / "runs/red/config.json")["profile"] == "runs/uniform"
    run([*common, "--strategy", "reduced", "--profile", "runs/random", "--any-profile", "--out", "runs/red2"], tmp_path)


def test_report_skips_unfinished_folders_and_expands_seeds(tmp_path):
    run(["--preset", "tiny", "--steps", "2", "--eval-every", "0", "--eval-n", "8", "--seeds", "0,1", "--out",
         "runs/s"], tmp_path)
    (tmp_path / "runs/empty").mkdir()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), "runs/s", "runs/empty", "runs/s/seed0"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [line.split()[0] for line in p.stdout.split("\n\n")[0].splitlines()[1:]]
    assert rows == ["s/seed0", "s/seed1"]  # the parent expanded, in order, seed0 once
    assert "skipped runs/empty: no results.json" in p.stdout
    assert "uniform" in p.stdout.split("Across seeds")[1].splitlines()[1]
    assert p.stdout.split("Across seeds")[1].splitlines()[1].split()[1] == "2"  # two runs, not three


def test_the_tiny_run_names_the_model_it_used_and_help_shows_defaults(tmp_path):
    run(["--preset", "tiny", "--steps", "1", "--eval-every", "0", "--eval-n", "4", "--out", "runs/t"], tmp_path)
    assert load(tmp_path / "runs/t/config.json")["model"] == "tiny"
    assert load(tmp_path / "runs/t/config.json")["model_path"] == "runs/t/tiny-model"
    assert load(tmp_path / "runs/t/adapter/adapter_config.json")["base_model_name_or_path"] == "runs/t/tiny-model"
    out = run(["--help"], tmp_path).stdout
    assert "[default: 1e-05]" in out and "[default: Qwen/Qwen2.5-1.5B-Instruct]" in out and "[default: off]" in out


def test_ctrl_c_twice_stops_at_once_in_one_line(tmp_path, monkeypatch):
    """The second Ctrl-C arrives while a step runs (sent from inside the step, so the timing is exact):
    SystemExit with one line, which Python prints without a traceback."""
    import os as _os
    import signal
    import time as _time
    import grpo
    import train
    real_rollout = grpo.rollout

    def rollout_with_two_interrupts(*args, **kw):
        _os.kill(_os.getpid(), signal.SIGINT)
        _time.sleep(0.05)  # the handler runs: first Ctrl-C, finish this step
        _os.kill(_os.getpid(), signal.SIGINT)
        _time.sleep(0.05)  # the second: out at once
        return real_rollout(*args, **kw)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(grpo, "rollout", rollout_with_two_interrupts)
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "tiny", "--steps", "5", "--eval-every", "0", "--out", "runs/i"])
    assert str(e.value).strip() == ("interrupted twice: stopped at once; --resume runs/i continues from the last "
                                    "checkpoint")


def test_ctrl_c_during_the_final_evaluation_exits_in_one_line(tmp_path, monkeypatch):
    """Outside the step loop Ctrl-C is Python's KeyboardInterrupt; the command line turns it into one line."""
    import evaluate
    import train

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate, "evaluate", interrupted)
    with pytest.raises(SystemExit) as e:
        train.cli(["--preset", "tiny", "--steps", "1", "--eval-every", "0", "--out", "runs/e"])
    assert str(e.value).strip() == ("interrupted: nothing after the last checkpoint was saved; --resume RUN_DIR "
                                    "continues")
    assert (tmp_path / "runs/e/checkpoint.pt").exists()  # the training before it is kept


def test_without_network_the_error_says_how_to_run_offline(tmp_path):
    """The default model comes from the Hub, which this machine cannot reach: one line, with the way out."""
    from conftest import GSM8K_DIR
    if not os.path.isdir(GSM8K_DIR):
        pytest.skip("../shared/data/gsm8k not present")
    p = run(["--strategy", "uniform", "--device", "cpu", "--data", GSM8K_DIR, "--out", "runs/u"], tmp_path, ok=False,
            env={"HF_HUB_OFFLINE": "1"})  # never a 3 GB download, even where the Hub can be reached
    err = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(err) == 1, p.stderr[-2000:]
    assert "cannot load model 'Qwen/Qwen2.5-1.5B-Instruct'" in err[0] and "--preset tiny runs offline" in err[0]
    assert "--model DIR" in err[0] and not (tmp_path / "runs").exists()


def test_the_loop_profiles_the_whole_batchs_gradient_once_per_step_before_clipping(tmp_path):
    """train.py's loop: profiler.record() sees the gradient of the whole batch (all micro-batches), before
    clipping, once per step whatever --num-iterations is. Recording after the clip, after the first
    micro-batch, or on every pass fails here."""
    from safetensors.torch import load_file
    common = ["--preset", "tiny", "--steps", "3", "--eval-n", "4", "--eval-every", "0", "--max-grad-norm", "1e-6"]
    rows = {}
    for name, extra in (("mb16", ["--micro-batch", "16"]), ("mb3", ["--micro-batch", "3"]),
                        ("passes3", ["--num-iterations", "3"])):
        run([*common, *extra, "--out", f"runs/{name}"], tmp_path)
        prof = load_file(str(tmp_path / f"runs/{name}/profile.safetensors"))["grad_norms"].double()
        logged = [json.loads(line)["grad_norm"] for line in (tmp_path / f"runs/{name}/metrics.jsonl").open()]
        assert prof.shape[0] == len(logged) == 3, name  # one row per step
        rows[name] = prof
        if name != "passes3":  # the logged norm is the pre-clip norm of the same (first-pass) gradient
            total = prof.square().sum((1, 2, 3)).sqrt()
            np.testing.assert_allclose(total.numpy(), logged, rtol=1e-5)
            assert min(logged) > 1e-3  # far above the clip: the profile is not the clipped gradient
    np.testing.assert_allclose(rows["mb16"][0].numpy(), rows["mb3"][0].numpy(), rtol=1e-4, atol=1e-9)


def test_the_imports_go_one_way_as_the_readme_says():
    """Each module's project imports, as README's reading guide describes them: the task (gsm8k.py)
    imports nothing, only train.py wires everything, and nothing imports train.py."""
    import ast
    import glob
    expected = {
        "model": [], "gsm8k": [], "parallel": [], "rundir": [], "generate": ["model"], "lora": ["rundir"],
        "evaluate": ["generate", "gsm8k"], "grpo": ["generate", "logprobs", "lora", "model", "parallel"],
        "logprobs": ["model"], "sft": ["gsm8k", "logprobs", "model", "parallel"], "profiler": ["lora", "rundir"],
        "allocate": ["rundir"],
        "dynamic": ["allocate", "lora", "profiler"], "checkpoint": ["lora", "rundir"],
        "config": ["allocate", "grpo", "gsm8k", "lora", "model", "organism", "rundir", "tiny"],
        "tiny": ["gsm8k", "logprobs", "model", "sft"],
        "organism": ["gsm8k", "logprobs", "model", "rundir", "sft", "tiny"], "study": ["config", "organism", "rundir", "study_report"],
        "study_report": ["profiler", "report", "rundir", "stats"], "stats": [],
        "report": ["profiler", "rundir", "stats"], "plan": ["allocate", "config", "grpo", "logprobs", "lora", "model"], "bench": ["bench_organism", "generate", "grpo", "logprobs", "lora", "model", "profiler", "rundir"],
        "bench_organism": ["config", "evaluate", "grpo", "gsm8k", "logprobs", "lora", "model", "organism", "profiler",
                           "rundir", "stats", "tiny"],
    }
    files = sorted(glob.glob(os.path.join(ROOT, "*.py")))
    names = {os.path.basename(f)[:-3] for f in files}
    for f in files:
        name = os.path.basename(f)[:-3]
        deps = set()
        for node in ast.walk(ast.parse(open(f).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
        deps = sorted(deps & names)
        if name == "train":
            assert "train" not in deps
            continue
        assert name in expected, f"{name}.py is new: add it to README's reading guide and to this test"
        assert deps == expected[name], (name, deps)


def test_the_logged_learning_rate_is_the_one_each_step_used(tmp_path):
    """Warm-up then cosine, counted in steps whatever --num-iterations is: the logged lr of step s is
    lr x factor(s - 1). Logging the rate after the scheduler step, or stepping the schedule on every pass,
    fails here."""
    import math
    run(["--preset", "tiny", "--steps", "5", "--warmup-steps", "2", "--lr-schedule", "cosine", "--lr", "1e-3",
         "--num-iterations", "2", "--eval-n", "4", "--eval-every", "0", "--out", "runs/lr"], tmp_path)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "runs/lr/metrics.jsonl").open()]

    def factor(s):
        return (s + 1) / 2 if s < 2 else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 2) / 3))

    np.testing.assert_allclose(logged, [1e-3 * factor(s) for s in range(5)], rtol=1e-12)


def test_a_run_without_signal_says_so_and_never_prints_nan(tmp_path):
    """Both reward weights 0: every group ties, every advantage and gradient is 0. Each step line and
    metrics line says so, the end says how many steps carried nothing, results.json counts them, the
    profile's statistics read "no signal" (no NaN, no warning), a dynamic move keeps the ranks and says
    why, and proportional refuses the profile naming the cause."""
    zero = ["--reward-correct", "0", "--reward-format", "0"]
    p = run(["--preset", "tiny", "--strategy", "dynamic", *zero, "--out", "runs/zero"], tmp_path)
    steps = [line for line in p.stderr.splitlines() + p.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 12 and all("no signal: every group tied" in line for line in steps)
    assert "warning: 12 of 12 steps carried no gradient (12 with every group's rewards tied)" in p.stdout + p.stderr
    assert "ranks kept at step 3: no gradient in the last 3 profiled steps" in p.stdout + p.stderr
    metrics = [json.loads(line) for line in open(tmp_path / "runs/zero/metrics.jsonl")]
    assert all(m["no_signal"] for m in metrics) and "moved_ranks" not in str(metrics)
    res = load(tmp_path / "runs/zero/results.json")
    assert res["steps_without_signal"] == res["steps_without_gradient"] == 12
    summary = (tmp_path / "runs/zero/profile_summary.json").read_text()
    assert "NaN" not in summary and json.loads(summary)["raw"]["no_signal"] is True
    prof = subprocess.run([sys.executable, "-W", "error", os.path.join(ROOT, "profiler.py"), "runs/zero"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert prof.returncode == 0 and "no signal" in prof.stdout and "nan" not in prof.stdout.lower(), prof.stderr
    p = run(["--preset", "tiny", "--strategy", "proportional", "--profile", "runs/zero", "--any-profile",
             "--out", "runs/p"], tmp_path, ok=False)
    assert p.returncode != 0 and "the profile carries no gradient" in p.stderr and "no reward signal" in p.stderr
    assert not (tmp_path / "runs/p").exists()
    ok = run(["--preset", "tiny", "--steps", "2", "--out", "runs/ok"], tmp_path)  # a run with signal: no warning
    assert "warning" not in ok.stdout + ok.stderr and load(tmp_path / "runs/ok/results.json")["steps_without_gradient"] == 0


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path):
    """A --resume (or a killed study's rerun) on a folder another train.py is writing is refused with the
    holder's pid and writes nothing; once the holder is killed (SIGKILL), the resume goes ahead."""
    import signal
    import time
    first = subprocess.Popen([sys.executable, TRAIN, "--preset", "tiny", "--steps", "400", "--checkpoint-every", "1",
                              "--out", "runs/a"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "runs/a/checkpoint.pt").exists():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        before = (tmp_path / "runs/a/config.json").read_bytes()
        p = run(["--resume", "runs/a", "--threads", "1"], tmp_path, ok=False)
        assert p.returncode != 0 and f"being written by another process (pid {first.pid}" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and (tmp_path / "runs/a/config.json").read_bytes() == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    p = run(["--resume", "runs/a", "--stop-after", "1"], tmp_path)
    assert "resumed at step" in p.stdout + p.stderr


def test_different_seeds_draw_different_sampling_noise(tmp_path, monkeypatch):
    """The same prompts and, at step 0, the same model (B = 0): only the sampling noise can differ. It
    must follow --seed (the same seed twice: the same completions; another seed: others)."""
    import config
    import grpo
    import train

    class Stop(Exception):
        pass

    texts, fixed, real = [], [], grpo.rollout

    def first_rollout(*args, **kwargs):
        texts.append(real(*args, **kwargs).texts)
        raise Stop

    monkeypatch.setattr(grpo, "rollout", first_rollout)
    monkeypatch.chdir(tmp_path)
    for i, seed in enumerate((0, 0, 1)):
        cfg, _ = config.parse_args(["--preset", "tiny", "--seed", str(seed)])
        r = train.Run(cfg, f"r{i}", torch.device("cpu"))
        fixed = fixed or r.batch(0)  # seed 0's problems for every run: data order is not what is tested
        monkeypatch.setattr(r, "batch", lambda step: fixed)
        with pytest.raises(Stop):
            train.train(r, None)
    assert texts[0] == texts[1] and texts[2] != texts[0]


def test_a_bf16_run_on_the_cpu_trains_with_log_probs_close_to_fp32(tmp_path):
    """--dtype bf16 on the CPU (the precision of a CUDA run): the run trains, its adapters stay fp32,
    and the tiny model's bf16 log-probs are within 0.1 nats of fp32's (0.044 at most, 0.011 on average,
    measured: bf16 keeps 8 bits of mantissa on logits of about 10)."""
    from safetensors.torch import load_file
    import logprobs as LP
    import model as M
    p = run(["--preset", "tiny", "--dtype", "bf16", "--steps", "3", "--eval-n", "8", "--eval-every", "0",
             "--out", "runs/bf16"], tmp_path)
    assert "(bfloat16 weights)" in p.stdout and load(tmp_path / "runs/bf16/config.json")["dtype"] == "bf16"
    adapter = load_file(tmp_path / "runs/bf16/adapter/adapter_model.safetensors")
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # B moved from 0: it trained
    folder = str(tmp_path / "runs/bf16/tiny-model")
    ids = torch.randint(0, 300, (4, 40), generator=torch.Generator().manual_seed(0))
    lp = {d: LP.completion_logprobs(M.from_pretrained(folder, device="cpu", dtype=d), ids, None, 30)[0].detach()
          for d in (torch.float32, torch.bfloat16)}
    assert (lp[torch.float32] - lp[torch.bfloat16]).abs().max() < 0.1


def test_a_gpu_runs_recorded_device_is_a_valid_setting():
    """A run records the device it ran on ("cuda:0"), so --resume and --config must accept cuda:N; on a
    machine without CUDA they say so in one line, and --plan needs no GPU at all."""
    import config
    config.check(config.TrainConfig(device="cuda:0"), planning=True)
    for device, why in (("cuda:0", "--device cuda:0: PyTorch"), ("cuda:x", "unknown; allowed: cpu, cuda (or cuda:N)")):
        if device == "cuda:0" and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit, match=re.escape(why)):
            config.check(config.TrainConfig(device=device))
