"""report.py: the paired statistics against known values."""

import json
import math

import numpy as np
import pytest

import report as R


def test_mcnemar_exact_known_values():
    assert R.mcnemar_exact(0, 0) == 1.0
    assert R.mcnemar_exact(5, 5) == 1.0
    assert R.mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # 2 x 0.5^6
    assert R.mcnemar_exact(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0386
    # the study's 74.5% vs 70.0% on 200 problems: 9 problems apart. With 9 vs 0 disagreements it is
    # distinguishable; with 29 vs 20 (the same gap, more disagreement) it is not.
    assert R.mcnemar_exact(9, 0) < 0.01 and R.mcnemar_exact(29, 20) > 0.2


def test_paired_bootstrap_brackets_the_difference():
    rng = np.random.default_rng(0)
    a = (rng.random(1000) < 0.75).astype(float)
    b = a.copy()
    b[:60] = 0  # b loses up to 60 problems a solved
    lo, hi = R.paired_bootstrap(a, b)
    d = a.mean() - b.mean()
    assert lo < d < hi and lo > 0
    lo, hi = R.paired_bootstrap(a, a)
    assert lo == hi == 0.0


def test_paired_bootstrap_covers_the_true_difference_95_percent_of_the_time():
    """1000 datasets of 200 problem pairs drawn with a known difference: the interval covers it 93-97% of
    the time (nominal 95%, binomial sd 0.7 points; measured over 4000 datasets: 94.95%) and misses it
    1-4% of the time on each side (nominal 2.5%, sd 0.5), so it is neither too narrow nor off-centre.
    A and B are correlated (60% solved by both), so an unpaired bootstrap would cover ~99.9%."""
    datasets = 1000
    rng = np.random.default_rng(0)
    kind = rng.choice(4, size=(datasets, 200), p=[0.60, 0.25, 0.10, 0.05])  # both, neither, only A, only B
    a, b = np.isin(kind, (0, 2)).astype(float), np.isin(kind, (0, 3)).astype(float)
    true = 0.10 - 0.05
    below = above = 0  # the interval lies wholly below / above the true difference
    for k in range(datasets):
        lo, hi = R.paired_bootstrap(a[k], b[k], resamples=1000, seed=k)
        below += hi < true
        above += lo > true
    assert 0.93 <= 1 - (below + above) / datasets <= 0.97, (below, above)
    assert 0.01 <= below / datasets <= 0.04 and 0.01 <= above / datasets <= 0.04, (below, above)


def write_eval(folder, correct: dict):
    folder.mkdir()
    with open(folder / "eval_final.jsonl", "w") as f:
        for i, c in correct.items():
            f.write(json.dumps({"index": i, "correct": c}) + "\n")
    return str(folder)


def test_compare_counts_the_discordant_problems(tmp_path):
    """50 problems both solve, 30 neither, 12 only A, 3 only B: McNemar looks at 12 vs 3 alone,
    p = 2·(C(15,0)+C(15,1)+C(15,2)+C(15,3))/2^15 = 0.03515625."""
    kinds = [(1, 1)] * 50 + [(0, 0)] * 30 + [(1, 0)] * 12 + [(0, 1)] * 3
    a = write_eval(tmp_path / "a", {i: bool(x) for i, (x, _) in enumerate(kinds)})
    b = write_eval(tmp_path / "b", {i: bool(y) for i, (_, y) in enumerate(kinds)})
    r = R.compare(a, b)
    assert (r["n"], r["only_a"], r["only_b"]) == (95, 12, 3)
    assert r["mcnemar_p"] == pytest.approx(1152 / 32768, rel=1e-12)
    assert r["diff"] == pytest.approx(9 / 95)


def test_compare_refuses_runs_evaluated_on_different_problems(tmp_path):
    a = write_eval(tmp_path / "a", {i: True for i in range(10)})
    b = write_eval(tmp_path / "b", {i: True for i in range(5, 15)})
    with pytest.raises(SystemExit, match="different problems .10 and 10 problems, 5 shared"):
        R.compare(a, b)


def test_compare_of_two_seed_folders_pairs_them_by_seed(tmp_path, capsys):
    for arm, accs in (("a", {0: 0.5, 1: 0.6, 2: 0.4}), ("b", {0: 0.45, 1: 0.5, 2: 0.38, 3: 0.9})):
        for s, acc in accs.items():
            d = tmp_path / arm / f"seed{s}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps({"accuracy": acc}))
    r = R.compare_seeds(str(tmp_path / "a"), str(tmp_path / "b"))  # seed 3 has no partner: left out
    assert r["per_seed"] == pytest.approx({0: 5.0, 1: 10.0, 2: 2.0})
    assert r["mean"] == pytest.approx(17 / 3) and r["p_sign_flip"] == pytest.approx(2 / 8)
    R.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "3 seeds paired: seed 0 +5.0, seed 1 +10.0, seed 2 +2.0" in out and "sign-flip p = 0.250" in out
    with pytest.raises(SystemExit, match="share no finished"):
        R.compare_seeds(str(tmp_path / "a"), str(tmp_path / "nothing"))


def write_results(folder, seed: int, accuracy: float):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(
        {"strategy": "uniform", "seed": seed, "accuracy": accuracy, "ci95": [0.0, 1.0], "format_rate": 1.0,
         "n": 100, "lora_params": 1000, "rank_min": 8, "rank_max": 8}))


def test_spread_across_seeds_is_the_sample_standard_deviation(tmp_path, capsys):
    """Accuracies 40, 50, 60% on three seeds: std 10.0 (n - 1 denominator; the population sd would be 8.2)
    and t interval 50 ± 4.303·10/√3 = 25.2-74.8; the paired comparison's sd of 5, 10, 2 is √(49/3) = 4.04."""
    for s, acc in enumerate((0.40, 0.50, 0.60)):
        write_results(tmp_path / "a" / f"seed{s}", s, acc)
    R.main([str(tmp_path / "a")])
    row = capsys.readouterr().out.split("Across seeds")[1].splitlines()[1].split()
    assert row == ["uniform", "3", "50.0%", "25.2-74.8", "10.0", "40.0", "60.0"]
    for s, acc in enumerate((0.35, 0.40, 0.58)):
        write_results(tmp_path / "b" / f"seed{s}", s, acc)
    r = R.compare_seeds(str(tmp_path / "a"), str(tmp_path / "b"))
    assert r["per_seed"] == pytest.approx({0: 5.0, 1: 10.0, 2: 2.0})
    assert r["sd"] == pytest.approx(math.sqrt(49 / 3))
