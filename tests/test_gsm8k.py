"""gsm8k.py: exact data, auditable rewards that never raise, and the evaluation's plumbing."""

import json
import os
import random
from fractions import Fraction

import pytest

import gsm8k as G
from conftest import GSM8K_DIR

HAVE_DATA = os.path.isfile(os.path.join(GSM8K_DIR, "train.jsonl"))


@pytest.mark.skipif(not HAVE_DATA, reason="shared GSM8K files absent")
def test_real_files_checksums_and_every_gold_parses():
    for split in ("train", "test"):
        assert G.sha256_of(os.path.join(GSM8K_DIR, f"{split}.jsonl")) == G.SHA256[split]
        examples = G.load_gsm8k(split, GSM8K_DIR)
        assert len(examples) == G.SIZES[split]
        for ex in examples:
            assert isinstance(ex.gold, Fraction)
            assert ex.gold.denominator == 1  # every GSM8K answer is an integer
            tail = ex.solution.rsplit("####", 1)[1].strip()
            assert tail and str(ex.gold) == tail.replace(",", "")  # exact, no sign or digit lost
            # the SFT target is well-formed and scores 1 on both rewards
            ref = G.reference_completion(ex)
            assert G.format_reward(ref) == 1.0 and G.correct_reward(ref, ex.gold) == 1.0


def test_malformed_lines_name_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "a\n#### 1,234"})
    p = tmp_path / "train.jsonl"
    p.write_text(good + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: malformed"):
        G.load_gsm8k("train", str(p), verify=False)
    p.write_text(good + "\n" + good + "\n" + json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:3: .*####"):
        G.load_gsm8k("train", str(tmp_path), verify=False)
    p.write_text(good + "\n")
    assert G.load_gsm8k("train", str(p), verify=False)[0].gold == 1234
    with pytest.raises(ValueError, match="allowed"):
        G.load_gsm8k("dev", str(p))
    p.write_text("\n")
    with pytest.raises(ValueError, match=r"train\.jsonl: no problems"):
        G.load_gsm8k("train", str(p), verify=False)
    with pytest.raises(FileNotFoundError, match=r"test\.jsonl: no such file"):
        G.load_gsm8k("test", str(tmp_path))


def test_a_changed_gold_answer_is_refused_naming_the_file(tmp_path):
    """--data files are checked against the release's sha256: one changed gold answer is refused."""
    src = os.path.join(GSM8K_DIR, "test.jsonl")
    if not os.path.isfile(src):
        pytest.skip("../shared/data/gsm8k not present")
    lines = open(src).read().splitlines(keepends=True)
    rec = json.loads(lines[5])
    rec["answer"] = rec["answer"].rsplit("####", 1)[0] + "#### 999999"
    lines[5] = json.dumps(rec) + "\n"
    (tmp_path / "test.jsonl").write_text("".join(lines))
    with pytest.raises(G.ChecksumError, match=r"test\.jsonl: sha256 .* is not the GSM8K test release's"):
        G.load_gsm8k("test", str(tmp_path))
    assert G.load_gsm8k("test", str(tmp_path), verify=False)[5].gold == 999999  # the opt-out reads it


def test_subset_is_seeded_and_ordered():
    ex = G.synthetic_problems(50)
    a, b = G.subset(ex, 10, seed=3), G.subset(ex, 10, seed=3)
    assert [e.index for e in a] == [e.index for e in b] == sorted(e.index for e in a)
    assert G.subset(ex, None) is ex


FORMAT_CASES = [
    ("<reasoning>\n2+2\n</reasoning>\n<answer>\n4\n</answer>", 1.0, 1.0),
    ("<reasoning>\n2+2\n</reasoning>\n<answer>\n4\n</answer>\n", 1.0, 1.0),
    ("<reasoning>\nmulti\nline\n</reasoning>\n<answer>\n4\n</answer>", 1.0, 1.0),
    ("<reasoning>2+2</reasoning><answer>4</answer>", 0.0, 1.0),  # no newlines: strict fails
    ("Sure! <reasoning>\nx\n</reasoning>\n<answer>\n4\n</answer>", 0.0, 1.0),  # text before
    ("<reasoning>\nx\n</reasoning>\n<answer>\n4\n</answer> done", 0.0, 1.0),  # text after
    ("<answer>\n4\n</answer>", 0.0, 0.5),
    ("<reasoning>\n<answer>\n4\n</answer>\n</reasoning>\n<answer>\n4\n</answer>", 0.0, 0.5),  # nested
    ("<reasoning>\nx\n</reasoning>\n<answer>\n4", 0.0, 0.75),  # unclosed
    ("</answer>4<answer></reasoning>x<reasoning>", 0.0, 0.25),  # all four once, in reverse order
    ("<answer>\n4\n</answer>\n<reasoning>\nx\n</reasoning>", 0.0, 0.5),  # two in-order pairs, swapped
    ("<reasoning>\nx\n<answer>\n</reasoning>\n4\n</answer>", 0.0, 0.75),  # one tag out of place
    ("", 0.0, 0.0),
]


@pytest.mark.parametrize("text, strict, partial", FORMAT_CASES)
def test_format_reward_table(text, strict, partial):
    assert G.format_reward(text) == strict
    assert G.format_reward(text, strict=False) == partial


CORRECT_CASES = [
    ("1,000", 1000, 1), ("$18", 18, 1), ("18.00", 18, 1), ("18.", 18, 1), ("-3", -3, 1), ("1/2", Fraction(1, 2), 1),
    ("0.5", Fraction(1, 2), 1), ("The answer is 18 dollars.", 18, 1), ("\n$1,250\n", 1250, 1), ("18", 17, 0),
    ("3 + 15 = 18", 18, 0), ("18dollars", 18, 0), ("1,00", 100, 0), ("eighteen", 18, 0), ("", 18, 0),
    ("18.5", 18, 0), ("1e3", 1000, 0), ("1/0", 1, 0), ("9" * 100, 1, 0), ("--3", -3, 0), ("5-3", 2, 0), ("(-3)", -3, 1),
    ("\u22123", -3, 1), ("\u22123", 3, 0), ("\uff0d3", -3, 1), ("\u2212$1,250", -1250, 1),  # Unicode minus signs
]


@pytest.mark.parametrize("answer, gold, expected", CORRECT_CASES)
def test_correct_reward_table(answer, gold, expected):
    text = f"<reasoning>\nwork 1 2 3\n</reasoning>\n<answer>\n{answer}\n</answer>"
    assert G.correct_reward(text, Fraction(gold)) == expected


def test_correctness_reads_the_last_answer_block_only():
    assert G.correct_reward("<answer>5</answer> then <answer>7</answer>", Fraction(7)) == 1.0
    assert G.correct_reward("no tags, the answer is 7", Fraction(7)) == 0.0
    assert G.lenient_answer("no tags, 3 then the answer is 7.") == 7


def test_rewards_never_raise_on_10000_adversarial_strings():
    rng = random.Random(0)
    pieces = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "<answer", "\n", " ", "$", "-", ",", ".",
              "/", "0", "7", "1,000", "9" * 5000, "1/0", "é", "日本", "\u200b", "\x00", "٣", "𝟗", "<<", ">>",
              "####", "1e309", "nan", "inf", "-0", "3.", ".5"]
    for i in range(10_000):
        if i % 3 == 0:  # random unicode soup
            s = "".join(chr(rng.randrange(0, 0x2FFFF)) for _ in range(rng.randrange(0, 40)))
        else:
            s = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 30)))
        for strict in (True, False):
            assert G.format_reward(s, strict) in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert G.correct_reward(s, Fraction(7)) in (0.0, 1.0)
        G.lenient_answer(s)


@pytest.mark.skipif(not HAVE_DATA, reason="shared GSM8K files absent")
def test_download_is_verified_and_atomic(monkeypatch, tmp_path):
    """The real download path, served from the shared copy through a file:// URL."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(G, "URL", "file://" + os.path.join(GSM8K_DIR, "{split}.jsonl"))
    test = G.load_gsm8k("test")
    assert len(test) == G.SIZES["test"]
    cached = os.path.join(G.cache_dir(), "test.jsonl")
    assert G.sha256_of(cached) == G.SHA256["test"]
    os.remove(cached)
    monkeypatch.setattr(G, "URL", "file://" + os.path.join(GSM8K_DIR, "train.jsonl"))  # the wrong file
    with pytest.raises(ValueError, match="wrong sha256"):
        G.download("test")
    assert not os.path.exists(cached) and not os.path.exists(cached + ".part")
