"""parallel.py: two CPU processes (gloo, launched by torchrun) equal one process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

import parallel
from conftest import ROOT

TRAIN = os.path.join(ROOT, "train.py")
ARGS = ["--preset", "tiny", "--steps", "4", "--eval-n", "8", "--eval-every", "0", "--checkpoint-every", "2"]
# One thread everywhere: torchrun gives each worker one, and a different thread count sums floats in a
# different order, which AdamW's first step (g / |g|) can turn into visible differences.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def single(args, cwd):
    p = subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def torchrun(args, cwd):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        TRAIN, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    from safetensors.torch import load_file
    single([*ARGS, "--out", "runs/one"], tmp_path)
    out = torchrun([*ARGS, "--out", "runs/two"], tmp_path)
    assert out.count("final evaluation") == 1  # only rank 0 speaks
    a = load_file(tmp_path / "runs/one/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "runs/two/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    pa = load_file(tmp_path / "runs/one/profile.safetensors")["grad_norms"]
    pb = load_file(tmp_path / "runs/two/profile.safetensors")["grad_norms"]
    assert pa.shape == pb.shape == (4, 4, 7, 2) and torch.allclose(pa, pb, rtol=1e-4, atol=1e-7)
    ma = [json.loads(line) for line in open(tmp_path / "runs/one/metrics.jsonl")]
    mb = [json.loads(line) for line in open(tmp_path / "runs/two/metrics.jsonl")]
    assert len(mb) == 4  # written once, by one process
    for x, y in zip(ma, mb):
        assert x["reward"] == pytest.approx(y["reward"]) and x["tokens"] == y["tokens"]
        assert x["kl"] == pytest.approx(y["kl"], abs=1e-6) and x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    ea = [json.loads(line) for line in open(tmp_path / "runs/one/eval_final.jsonl")]
    eb = [json.loads(line) for line in open(tmp_path / "runs/two/eval_final.jsonl")]
    assert [r["index"] for r in ea] == [r["index"] for r in eb] and len(eb) == 8  # sharded, gathered, in order
    # every process resumes from the same checkpoint
    torchrun([*ARGS, "--out", "runs/three", "--stop-after", "2"], tmp_path)
    torchrun(["--resume", "runs/three"], tmp_path)
    c = load_file(tmp_path / "runs/three/adapter/adapter_model.safetensors")
    for k in a:
        assert torch.allclose(a[k], c[k], atol=1e-5, rtol=1e-4), k


def test_without_torchrun_everything_is_a_no_op():
    assert not parallel.active() and parallel.rank() == 0 and parallel.world() == 1 and parallel.is_main()
    assert parallel.shard([1, 2, 3]) == [1, 2, 3] and parallel.sum_int(7) == 7 and parallel.gather("x") == ["x"]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    parallel.all_reduce_grads([p])
    assert torch.equal(p.grad, torch.ones(2))


def test_an_uneven_split_is_refused_before_anything_is_written(tmp_path):
    """3 prompts per step cannot be shared by 2 processes: one line, and no run folder left to block --out."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        TRAIN, *ARGS, "--prompts-per-step", "3", "--out", "runs/odd"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "error: --prompts-per-step 3 must be a multiple of the 2 processes torchrun started" in p.stderr
    assert not (tmp_path / "runs").exists()
