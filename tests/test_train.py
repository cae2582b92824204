"""train.py end to end through its real entry point (subprocesses), on the offline tiny preset."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

TRAIN = os.path.join(ROOT, "train.py")


def run(args, cwd, ok=True):
    p = subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
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
    (tmp_path / "bad.json").write_text('{\n  "model.layers.0.mlp.up_proj": 4,,\n}')
    (tmp_path / "nomatch.json").write_text('{"model.layers.99.mlp.up_proj": 4}')
    (tmp_path / "empty").mkdir()
    for args, expected in cases:
        p = run(args, tmp_path, ok=False)
        assert p.returncode != 0, args
        err = p.stderr.strip().splitlines()
        assert err and err[-1].startswith("error:") and expected in err[-1], (args, p.stderr[-500:])


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
    assert {line.split()[0] for line in stats if line.split()[-1:] != []} >= {"sft", "seed0", "seed1"}  # by folder
    assert any(line.split()[:3] == ["sft", "sft", "fixed"] for line in stats)  # algo and scale policy named
    # every seed is evaluated on the same problems (the subset does not follow the training seed)
    idx = [[json.loads(line)["index"] for line in open(tmp_path / f"runs/grpo/seed{s}/eval_final.jsonl")] for s in (0, 1)]
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


def test_a_crash_mid_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
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
    with pytest.raises(OSError, match="disk full"):
        train.main(["--resume", "runs/c"])
    monkeypatch.undo()
    assert ckpt.read_bytes() == before and torch.load(ckpt, weights_only=False)["step"] == 2


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
    for script in ("train.py", "allocate.py", "profiler.py", "report.py", "bench.py"):
        p = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0 and "usage:" in p.stdout, (script, p.stderr[-1000:])
    p = subprocess.run([sys.executable, TRAIN, "--help"], capture_output=True, text=True, timeout=120)
    for flag in ("--strategy", "--algo", "--seeds", "--config", "--resume", "--dynamic-every", "--stop-after"):
        assert flag in p.stdout


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
