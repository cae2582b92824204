"""report.py: the paired statistics against known values."""

import json

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
