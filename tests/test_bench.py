"""bench.py --organism: the whole run against TRL's GRPOTrainer + PEFT, end to end on the tiny preset."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_organism_comparison_runs_both_sides_and_writes_its_keys(tmp_path):
    """One seed of the tiny preset on each side: both train all 12 steps on their share of tokens, both
    adapters are scored on the same 32 problems, and the JSON holds the keys BENCH.md quotes."""
    pytest.importorskip("trl")
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--organism", "--preset", "tiny", "--seeds",
                        "1", "--jobs", "1", "--json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("organism_train_s", "organism_train_s_trl", "organism_speedup_vs_trl", "organism_accuracy",
                "organism_accuracy_trl"):
        assert isinstance(res[key], float), key
    ours, trl = (next(r for r in res["organism"]["runs"] if r["side"] == side) for side in ("ours", "trl"))
    assert trl["steps"] == 12 and len(trl["reward"]) == 12  # TRL's optimiser steps: the preset's
    assert ours["n"] == trl["n"] == 32 and 0 <= ours["accuracy"] <= 1 and 0 <= trl["accuracy"] <= 1
    assert ours["tokens"] > 0 and trl["tokens"] > 0 and ours["peak_rss_bytes"] > 0 and trl["peak_rss_bytes"] > 0
    assert res["organism_speedup_vs_trl"] == pytest.approx(trl["train_s"] / ours["train_s"])
    assert "faster than TRL + PEFT" in p.stdout
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--organism", "--baseline", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and f"--baseline {tmp_path}: no train.py there" in p.stderr


def test_the_accuracy_difference_is_welchs_interval():
    """Equal spreads of 3 seeds each: Welch's df is exactly 4, and the interval and the detectable difference
    follow the printed t table (t 0.975 = 2.776, t 0.8 = 0.941 at 4 df)."""
    import bench_organism
    d = bench_organism.accuracy_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    se = (2 / 3) ** 0.5
    assert d["df"] == 4 and d["mean"] == pytest.approx(1.0)
    assert d["ci95"] == pytest.approx((1 - 2.776 * se, 1 + 2.776 * se), abs=1e-3)
    assert d["detectable"] == pytest.approx((2.776 + 0.941) * se, abs=1e-3)
    assert "ci95" not in bench_organism.accuracy_difference([0.5], [0.4, 0.6])  # one seed: no interval
