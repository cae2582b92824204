"""study_report.py on hand-made run folders with known answers: each seed of an arm is read against the
same seed of uniform, an arm's flatness comes from its own profiles, step 0 is the reference, the
sweep becomes accuracy against rank, and nothing prints as NaN."""

import json
import math
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import stats
import study_report as SR
from lora import TARGETS

N = 100  # problems per evaluation
LAYERS = 6


def make_run(folder, acc: int, shares=None, step0=None, steps=4, **extra):
    """A finished run: `acc` of N problems solved (the first `acc`), and a profile whose layer norms are
    `shares` at every step but the first, which is `step0` (default: the same)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "eval_final.jsonl"), "w") as f:
        for i in range(N):
            f.write(json.dumps({"index": i, "correct": i < acc}) + "\n")
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"accuracy": acc / N, "ci95": [0, 1], "n": N, "code_version": "abc", "torch_version": "t",
                   "steps": steps, **extra}, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for s in range(steps):
            f.write(json.dumps({"step": s, "reward/correct": 0.1 * s}) + "\n")
    shares = np.ones(LAYERS) if shares is None else np.asarray(shares, float)
    step0 = shares if step0 is None else np.asarray(step0, float)
    # a layer's norm is sqrt of 14 equal squared matrix norms: each matrix gets norm / sqrt(14)
    per_matrix = lambda v: np.repeat(v[:, None, None] / math.sqrt(2 * len(TARGETS)), len(TARGETS), 1).repeat(2, 2)
    g = np.stack([per_matrix(step0)] + [per_matrix(shares)] * (steps - 1)).astype(np.float32)
    ranks = np.full((steps, LAYERS, len(TARGETS)), 8, np.int32)
    save_file({"grad_norms": g, "ranks": ranks, "scales": np.full(ranks.shape, 2.0, np.float32)},
              os.path.join(folder, "profile.safetensors"),
              metadata={"modules": json.dumps(list(TARGETS)), "layers": str(LAYERS)})


UNIFORM = {0: 40, 1: 50, 2: 60, 3: 45}  # seeds differ by far more than the arms do
DIFFS = {0: 2, 1: 4, 2: 1, 3: 5}  # proportional minus uniform, seed by seed
HOT = [6, 1, 1, 1, 1, 2]  # sft-uniform's profile: layer 0 hot
FLAT_STEP0 = [3, 1, 1, 1, 1, 1]


@pytest.fixture
def study(tmp_path):
    out = tmp_path / "study"
    make_run(str(out / "base"), 30)
    for s, acc in UNIFORM.items():
        make_run(str(out / "uniform" / f"seed{s}"), acc, shares=[1, 1, 1, 1, 1, 1], step0=FLAT_STEP0)
        make_run(str(out / "proportional" / f"seed{s}"), acc + DIFFS[s], shares=[2, 1, 1, 1, 1, 1])
        make_run(str(out / "sft-uniform" / f"seed{s}"), 70 + s, shares=HOT)
        make_run(str(out / "sft-r1" / f"seed{s}"), 50 + s, shares=HOT)
        make_run(str(out / "uniform-r1" / f"seed{s}"), acc, shares=[1, 1, 1, 1, 1, 1])
    return str(out)


def test_each_seed_is_read_against_the_same_seed_of_uniform(study):
    SR.write(study)
    summary = json.load(open(os.path.join(study, "summary.json")))
    prop = summary["accuracy"]["proportional"]["vs"]
    assert prop["against"] == "uniform"
    assert {int(k): v for k, v in prop["per_seed"].items()} == pytest.approx(DIFFS)
    expect = stats.paired(list(DIFFS.values()))
    assert prop["mean"] == pytest.approx(3.0) and prop["ci95"] == pytest.approx(list(expect["ci95"]))
    assert prop["sd"] == pytest.approx(np.std([2, 4, 1, 5], ddof=1))  # a wrong pairing has sd ~ 9
    assert prop["p_sign_flip"] == pytest.approx(2 / 16) and prop["detectable"] == pytest.approx(expect["detectable"])
    base = summary["accuracy"]["base"]["vs"]  # the base model against every seed of uniform
    assert {int(k): v for k, v in base["per_seed"].items()} == pytest.approx({s: 30 - a for s, a in UNIFORM.items()})
    # the SFT sweep is read against sft-uniform, the SFT arm at r0, seed by seed: -20 on every seed
    sweep = summary["accuracy"]["sft-r1"]["vs"]
    assert sweep["against"] == "sft-uniform" and sweep["mean"] == pytest.approx(-20) and sweep["sd"] == 0
    assert summary["accuracy"]["uniform"]["mean"] == pytest.approx(np.mean(list(UNIFORM.values())))


def test_flatness_is_read_from_each_arms_own_profiles_with_step_0_as_reference(study):
    SR.write(study)
    flat = json.load(open(os.path.join(study, "summary.json")))["flatness"]
    hot = np.array(HOT) / sum(HOT) * 100
    sft = flat["sft-uniform/over training"]
    assert sft["eff"] == pytest.approx([stats.effective_layers(hot)] * 4)
    assert sft["gini"] == pytest.approx([stats.gini(hot)] * 4)
    assert sft["eff_no0"] == pytest.approx([stats.effective_layers(hot[1:])] * 4)
    assert sft["layer0"] == pytest.approx([50.0] * 4) and sft["max_min"] == pytest.approx([6.0] * 4)
    uni = flat["uniform/over training"]  # steps 1.. flat, step 0 hot at layer 0: the mean norm over steps
    mean = (np.array(FLAT_STEP0) + 3 * np.ones(LAYERS)) / 4
    assert uni["eff"] == pytest.approx([stats.effective_layers(mean)] * 4)
    ref = flat["uniform/step 0"]
    assert ref["max_min"] == pytest.approx([3.0] * 4) and ref["hottest"] == [0] * 4
    assert ref["eff"] == pytest.approx([stats.effective_layers(FLAT_STEP0)] * 4)


def test_capacity_table_orders_ranks_per_regime(study):
    SR.write(study)
    cap = json.load(open(os.path.join(study, "summary.json")))["capacity"]
    assert list(cap) == ["grpo", "sft"] and list(cap["sft"]) == ["1", "8"]
    assert cap["sft"]["1"]["mean"] == pytest.approx(51.5) and cap["sft"]["8"]["mean"] == pytest.approx(71.5)
    m, lo, hi = stats.mean_interval([70, 71, 72, 73])
    assert cap["sft"]["8"]["ci95"] == pytest.approx([lo, hi])
    report = open(os.path.join(study, "REPORT.md")).read()
    assert "| sft | 1 | 4 | 51.5 [" in report and "Made with: code abc, torch t." in report


def test_one_seed_and_no_signal_print_dashes_not_nan(tmp_path):
    out = tmp_path / "study"
    make_run(str(out / "uniform" / "seed0"), 40, shares=np.zeros(LAYERS))  # a profile without gradient
    make_run(str(out / "proportional" / "seed0"), 45)
    SR.write(str(out))
    report = open(out / "REPORT.md").read()
    assert "nan" not in report.lower()
    assert "one seed: no interval" in report and "| uniform | over training | 1 | no signal |" in report
    assert "(no signal)" in report  # amplification against a profile without gradient
    text = open(out / "summary.json").read()
    assert "NaN" not in text
    json.loads(text)


def test_flatness_is_compared_with_its_references_seed_by_seed(study):
    SR.write(study)
    cmp = json.load(open(os.path.join(study, "summary.json")))["flatness_comparisons"]
    mean = (np.array(FLAT_STEP0) + 3 * np.ones(LAYERS)) / 4  # uniform over training; step 0 is FLAT_STEP0
    over_vs_0 = stats.effective_layers(mean) - stats.effective_layers(FLAT_STEP0)
    assert cmp["uniform: over training - step 0/eff"]["diffs"] == pytest.approx([over_vs_0] * 4)
    grpo_vs_sft = stats.gini(mean) - stats.gini(HOT)
    assert cmp["GRPO - SFT (uniform, over training)/gini"]["diffs"] == pytest.approx([grpo_vs_sft] * 4)
    assert cmp["GRPO - SFT (uniform, over training)/gini"]["mean"] == pytest.approx(grpo_vs_sft)


def test_runs_of_other_lengths_are_refused(study):
    make_run(os.path.join(study, "random", "seed0"), 40, steps=6)
    with pytest.raises(SystemExit, match="mixes runs of different presets or lengths .* 4 steps: 20 run.s., .* 6 steps: 1 run.s., e.g. .*random.seed0"):
        SR.write(study)


def test_the_verdict_names_what_the_seeds_can_say():
    assert SR.verdict(stats.paired([1, 2, 3, 4, 5, 6, 7, 8])) == "differs (t interval excludes 0, sign-flip p <= 0.05)"
    # 3 seeds, all the same sign and tight: t says differs, the exact test cannot go below 2/8
    assert SR.verdict(stats.paired([5.0, 5.2, 4.9])) == "differs by t only: 3 seeds cannot give a sign-flip p below 0.25"
    p = stats.paired([1, -1, 2, -1])
    assert SR.verdict(p) == f"no difference seen; detectable: {p['detectable']:.1f}"
    # 8 seeds: the floor (0.0078) is not the reason when the exact test disagrees with t
    assert SR.verdict(stats.paired([3.7, 3.0, 1.5, -0.8, 1.0, 2.0, -0.9, 1.6])) == \
        "differs by t only (sign-flip p = 0.055)"
    assert SR.verdict(stats.paired([2.3, 0.2, 1.3, 0, 1.6, -1.0, 1.4, 3.3])) == \
        "differs by the sign-flip test only (p = 0.047); the t interval includes 0"
    assert SR.verdict(stats.paired([0.0, 0.0, 0.0])) == "no difference: every seed gave the same difference"
    assert SR.verdict(stats.paired([3.0])) == "one seed: no interval"
