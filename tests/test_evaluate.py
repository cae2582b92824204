"""evaluate.py: greedy evaluation records and their summary, on a tiny checkpoint."""

import evaluate as E
import gsm8k as G
import model as M
from conftest import make_tiny_checkpoint


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
    assert res["ci95"] == E.wilson_interval(res["correct"], 12)
    for r, p in zip(records, problems):
        assert r["gold"] == str(p.gold) and r["question"] == p.question
        assert 1 <= r["tokens"] <= 16
        assert r["correct"] == (G.correct_reward(r["completion"], p.gold) == 1.0)
        assert r["format_ok"] == (G.format_reward(r["completion"]) == 1.0)
    again = E.evaluate(model, tok, problems, max_new_tokens=16, batch_size=12)  # batch size does not matter
    assert [r["completion"] for r in again] == [r["completion"] for r in records]
