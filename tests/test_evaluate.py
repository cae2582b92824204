"""evaluate.py: greedy evaluation records and their summary, on a tiny checkpoint."""

import math
from statistics import NormalDist

import pytest

import evaluate as E
import gsm8k as G
import model as M
from conftest import make_tiny_checkpoint


def wilson_by_hand(k, n):
    """The 95% Wilson interval as the two roots p of (k/n - p)^2 = z^2 p(1 - p) / n, a quadratic in p."""
    z2 = NormalDist().inv_cdf(0.975) ** 2
    a, b, c = 1 + z2 / n, -(2 * k / n + z2 / n), (k / n) ** 2
    d = math.sqrt(b * b - 4 * a * c)
    return (-b - d) / (2 * a), (-b + d) / (2 * a)


def test_wilson_interval_known_values():
    lo, hi = E.wilson_interval(50, 100)
    assert abs(lo - 0.4038) < 1e-4 and abs(hi - 0.5962) < 1e-4
    lo, hi = E.wilson_interval(0, 10)
    assert lo == 0.0 and abs(hi - 0.2775) < 1e-4
    lo, hi = E.wilson_interval(983, 1319)  # 74.5% on the full test set: about +-2.4 points
    assert abs(lo - 0.7213) < 1e-3 and abs(hi - 0.7677) < 1e-3


def test_evaluate_end_to_end_on_a_tiny_model(tmp_path):
    problems = G.synthetic_problems(12)
    texts = [G.prompt_text(p.question, M.Tokenizer.chat) + G.reference_completion(p) for p in problems]
    folder = make_tiny_checkpoint(tmp_path / "ckpt", texts)
    model, tok = M.from_pretrained(folder), M.load_tokenizer(folder)
    records = E.evaluate(model, tok, problems, max_new_tokens=16, batch_size=5)
    res = E.summarise(records)
    assert res["n"] == len(records) == 12
    assert [r["index"] for r in records] == list(range(12))
    assert res["correct"] == sum(r["correct"] for r in records)
    assert res["ci95"] == pytest.approx(wilson_by_hand(res["correct"], 12), abs=1e-12)
    for r, p in zip(records, problems):
        assert r["gold"] == str(p.gold) and r["question"] == p.question
        assert 1 <= r["tokens"] <= 16
        assert r["correct"] == (G.correct_reward(r["completion"], p.gold) == 1.0)
        assert r["format_ok"] == (G.format_reward(r["completion"]) == 1.0)
    again = E.evaluate(model, tok, problems, max_new_tokens=16, batch_size=12)  # batch size does not matter
    assert [r["completion"] for r in again] == [r["completion"] for r in records]


def test_summary_interval_is_the_accuracys_over_all_records():
    """3 correct, 5 lenient, 7 in format of 10: ci95 is Wilson(3, 10) = (0.1078, 0.6032), not another count's."""
    records = [{"correct": i < 3, "lenient_correct": i < 5, "format_ok": i < 7, "tokens": 10 + i} for i in range(10)]
    res = E.summarise(records)
    counts = res["n"], res["correct"], res["accuracy"], res["lenient_accuracy"], res["format_rate"]
    assert counts == (10, 3, 0.3, 0.5, 0.7)
    assert res["ci95"] == pytest.approx((0.1078, 0.6032), abs=1e-4)
    assert res["ci95"] == pytest.approx(wilson_by_hand(3, 10), abs=1e-12)
    assert (res["mean_tokens"], res["max_tokens"]) == (14.5, 19)
