"""allocate.py: exact budgets and bounds for every strategy, and the study's parameter counts."""

import json

import numpy as np
import pytest
import torch

import allocate as A
import lora as L
import model as M

STUDY_SHARES = [3.2, 3.09, 3.4, 3.5, 3.6, 3.5, 3.7, 3.8, 3.9, 3.7, 3.6, 3.8, 4.0, 4.2, 4.4, 4.68, 4.3, 4.1,
                3.9, 3.6, 3.4, 3.3, 3.2, 3.0, 2.8, 2.5, 2.15, 2.6]  # study-like: 2.15-4.68%, flat


def test_budget_exact_and_bounds_respected_over_many_random_profiles():
    rng = np.random.default_rng(0)
    for trial in range(500):
        n = int(rng.integers(1, 40))
        lo = int(rng.integers(0, 20))
        hi = lo + int(rng.integers(0, 30))
        budget = int(rng.integers(n * lo, n * hi + 1))
        shares = rng.gamma(rng.uniform(0.2, 5), size=n) * (rng.random(n) > 0.1)
        if shares.sum() == 0:
            shares[0] = 1.0
        if budget > np.where(shares > 0, hi, lo).sum():  # zero-share units cannot grow: a clear error
            with pytest.raises(ValueError, match="unreachable"):
                A.proportional(shares, budget, lo, hi)
            continue
        for ranks in (A.proportional(shares, budget, lo, hi), A.random_ranks(n, budget, lo, hi, trial)):
            assert sum(ranks) == budget and min(ranks) >= lo and max(ranks) <= hi
            assert all(isinstance(r, int) for r in ranks)


def test_proportional_follows_the_profile():
    r = A.proportional([1, 2, 3, 4], 20, 0, 100)
    assert r == [2, 4, 6, 8]
    r = A.proportional([1, 1, 1, 10], 40, 5, 15)  # the hot layer is clamped, the rest share what is left
    assert r[3] == 15 and sorted(r[:3]) == [8, 8, 9]
    ranks = A.allocate("proportional", 28, 896, STUDY_SHARES)
    assert (min(ranks), max(ranks)) == (20, 40) and sum(ranks) == 896
    assert ranks[15] == 40 and ranks[26] == 20  # hottest and coldest layers


def test_study_strategies_on_the_real_shape_count_exactly():
    counts = {}
    for strategy in A.STRATEGIES:
        ranks = A.allocate(strategy, 28, 896, STUDY_SHARES, seed=3)
        with torch.device("meta"):
            m = M.Qwen2(M.ModelConfig())
        got = L.apply_lora(m, r=32, rank_pattern=A.rank_pattern(ranks))
        assert [got[f"model.layers.{i}.mlp.up_proj"] for i in range(28)] == ranks
        counts[strategy] = L.count_lora_params(m)["total"]
        if strategy == "random":
            assert min(ranks) >= 16 and max(ranks) <= 48
    assert counts["uniform"] == counts["proportional"] == counts["random"] == 36_929_536
    assert counts["reduced"] == 627 * 41_216 == 25_842_432  # "25.8M"


def test_random_is_seeded():
    a, b = A.allocate("random", 28, 896, seed=5), A.allocate("random", 28, 896, seed=5)
    assert a == b != A.allocate("random", 28, 896, seed=6)


def test_impossible_requests_are_errors():
    with pytest.raises(ValueError, match=r"must lie in \[560, 1120\]"):
        A.allocate("proportional", 28, 1200, STUDY_SHARES, r_min=20, r_max=40)
    with pytest.raises(ValueError, match="needs a gradient profile"):
        A.allocate("reduced", 28, 896)
    with pytest.raises(ValueError, match="allowed"):
        A.allocate("adaptive", 28, 896)
    with pytest.raises(ValueError, match="multiple"):
        A.allocate("uniform", 28, 900)
    with pytest.raises(ValueError, match="expected 28"):
        A.allocate("proportional", 28, 896, [1.0] * 27)
    with pytest.raises(ValueError, match="unreachable"):
        A.proportional([0, 0, 0], 10, 0, 10)


def test_rank_pattern_paths_and_per_module_option():
    pat = A.rank_pattern([3, 5])
    assert pat["model.layers.1.self_attn.q_proj"] == 5 and len(pat) == 14
    pat = A.rank_pattern(list(range(14)), per_module=True)
    assert pat["model.layers.1.mlp.down_proj"] == 13 and pat["model.layers.0.self_attn.k_proj"] == 1


def test_cli_writes_json(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "profile_summary.json").write_text(json.dumps({"raw": {"shares": STUDY_SHARES}}))
    A.main(["--strategy", "reduced", "--profile", str(run), "--out", str(tmp_path / "r.json")])
    pat = json.loads((tmp_path / "r.json").read_text())
    assert len(pat) == 196 and sum(pat.values()) == 627 * 7
    assert "total 627" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="run a uniform arm first"):
        A.main(["--strategy", "proportional", "--profile", str(tmp_path / "nothing")])


def test_reduced_budget_is_rounded_not_truncated():
    """70% of 768 (24 layers x 32) is 537.6: the reduced budget is 538; truncation would give 537."""
    shares = np.linspace(2.0, 5.0, 24)
    assert sum(A.allocate("reduced", 24, 768, shares)) == 538
    assert sum(A.allocate("reduced", 28, 896, shares[:4].tolist() * 7)) == 627  # 627.2: rounds down
