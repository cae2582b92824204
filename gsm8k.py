"""GSM8K (Cobbe et al., arXiv 2110.14168): the data, the prompt and the two rewards.

The data is the original release's jsonl, checksum-verified. The model is asked to answer in the
format most public GRPO-on-GSM8K recipes for Qwen2.5-Instruct use:

    <reasoning>
    ...
    </reasoning>
    <answer>
    42
    </answer>

Two rewards, pure functions of (completion text, gold answer), that never raise:
  format_reward   strict: 1 when the whole completion is exactly that layout, else 0.
                  partial (strict=False): 0.25 for each tag in the largest set of tags that each
                  appear exactly once and stand in the layout's order (<reasoning>, </reasoning>,
                  <answer>, </answer>), so a model gets a gradient towards the format before it has it,
                  and all four tags out of order score 0.25, not 1.
  correct_reward  1 when the <answer> block holds exactly one number and it equals the gold answer;
                  "1,000", "$18", "18.00", "18.", "-3", "−3", "1/2" and words around the number are
                  fine, two numbers ("3 + 15 = 18") or none are not. Before parsing, the Unicode minus
                  signs U+2212, U+FE63 and U+FF0D become "-"; nothing else is normalised (other
                  Unicode digits or dashes are not read as numbers or signs).
lenient_answer, the last number anywhere, serves evaluate.py's lenient accuracy (models that ignore
the tags).

Left out: the model. This module is the task alone (it imports nothing from the project), so its
rewards can be read, tested and reused without a sampler; evaluate.py runs the model on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import urllib.request
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


SHA256 = {"train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
          "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"}
SIZES = {"train": 7473, "test": 1319}
URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"

SYSTEM_PROMPT = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""


@dataclass
class Example:
    index: int
    question: str
    solution: str  # the reference solution, ending with "#### N"
    gold: Fraction


# ------------------------------------------------------------------------------------------- data

def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "grpo-lora-rank", "gsm8k")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(split: str) -> str:
    """The original release's file, fetched once into the cache and checksum-verified, atomically."""
    path = os.path.join(cache_dir(), f"{split}.jsonl")
    if os.path.isfile(path) and sha256_of(path) == SHA256[split]:
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = path + ".part"
    try:
        urllib.request.urlretrieve(URL.format(split=split), tmp)
    except OSError as e:  # URLError: no network, no such host
        raise OSError(f"cannot download GSM8K {split} from {URL.format(split=split)}: "
                      f"{getattr(e, 'reason', None) or e}") from None
    if sha256_of(tmp) != SHA256[split]:
        os.remove(tmp)
        raise ValueError(f"downloaded GSM8K {split} has the wrong sha256 (expected {SHA256[split]})")
    os.replace(tmp, path)
    return path


def parse_gold(solution: str) -> Fraction:
    """The exact number after '####' (commas removed)."""
    if "####" not in solution:
        raise ValueError("answer has no '#### N' line")
    text = solution.rsplit("####", 1)[1].strip().replace(",", "")
    value = parse_number(text)
    if value is None:
        raise ValueError(f"answer's '####' line is not a number: {text!r}")
    return value


class ChecksumError(ValueError):
    """A data file that is not the GSM8K release it claims to be."""


def load_gsm8k(split: str, path: str | None = None, verify: bool = True) -> list[Example]:
    """Train or test problems from a file, a folder holding {split}.jsonl, or the original release.

    A given file is checked against the release's sha256 unless verify=False (a user's own data), so a
    changed gold answer cannot slip into a run that says it is GSM8K.
    """
    if split not in SHA256:
        raise ValueError(f"split {split!r} unknown; allowed: {sorted(SHA256)}")
    if path is None:
        path = download(split)
    else:
        if os.path.isdir(path):
            path = os.path.join(path, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (a GSM8K folder holds train.jsonl and test.jsonl)")
        if verify and (digest := sha256_of(path)) != SHA256[split]:
            raise ChecksumError(f"{path}: sha256 {digest[:12]}... is not the GSM8K {split} release's "
                                f"({SHA256[split][:12]}...): a changed or different file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                examples.append(Example(len(examples), rec["question"], rec["answer"], parse_gold(rec["answer"])))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: malformed GSM8K record: {e}") from None
    if not examples:
        raise ValueError(f"{path}: no problems in it")
    return examples


EVAL_SEED = 0  # evaluation subsets never follow a run's training seed: every seed scores the same problems


def subset(examples: list[Example], n: int | None, seed: int = EVAL_SEED) -> list[Example]:
    """A fixed-seed sample of n examples (all of them when n is None), in their original order."""
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def step_problems(examples: list[Example], seed: int, step: int, n: int) -> list[Example]:
    """The n problems of a training step: a fresh seeded permutation of the set each epoch, so they
    depend on (seed, step) alone (a resumed run, and bench.py's TRL run, draw the same ones)."""
    out = []
    for j in range(step * n, step * n + n):
        epoch, i = divmod(j, len(examples))
        out.append(examples[np.random.default_rng([seed, epoch]).permutation(len(examples))[i]])
    return out


def synthetic_problems(n: int, seed: int = 0) -> list[Example]:
    """GSM8K-format word problems generated in code (offline preset, tests): a + b or a * b."""
    rng = random.Random(seed)
    names, things = ["Ann", "Ben", "Cal", "Dee"], ["apples", "books", "coins", "pens"]
    out = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        who, what = rng.choice(names), rng.choice(things)
        if rng.random() < 0.5:
            q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have?"
            sol, gold = f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}", a + b
        else:
            q = f"{who} buys {a} boxes of {b} {what}. How many {what} is that?"
            sol, gold = f"{a} * {b} = <<{a}*{b}={a * b}>>{a * b}\n#### {a * b}", a * b
        out.append(Example(i, q, sol, Fraction(gold)))
    return out


# ----------------------------------------------------------------------------------------- prompt

def prompt_text(question: str, chat) -> str:
    """The chat-formatted prompt: our system prompt, the question, the assistant's turn opened."""
    return chat([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}])


def reference_completion(ex: Example) -> str:
    """The reference solution in the answer format (the SFT target): annotations and '####' removed."""
    reasoning = re.sub(r"<<[^>]*>>", "", ex.solution.rsplit("####", 1)[0]).strip()
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{format_number(ex.gold)}\n</answer>"


def format_number(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


# ---------------------------------------------------------------------------------------- rewards

STRICT_FORMAT = re.compile(r"<reasoning>\n(?:(?!</?reasoning>|</?answer>).)*?\n</reasoning>\n"
                           r"<answer>\n(?:(?!</?reasoning>|</?answer>).)*?\n</answer>\n?", re.DOTALL)
TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
# A number: optional sign and $, digits with correct thousands commas or plain, optional decimals or a
# trailing dot, or a fraction a/b. Letters or digits right next to it make it something else.
NUMBER = re.compile(r"(?<![\w.,/-])(-?)\$?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+)|\.(?!\d))?(?:/(\d+))?(?![\w,/-]|\.\d)")
MAX_DIGITS = 40  # longer "numbers" are not answers; also keeps int() away from huge strings


MINUS_SIGNS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})  # minus, small and fullwidth hyphen-minus


def parse_number(text: str) -> Fraction | None:
    """The single number in `text` as an exact Fraction, or None (none, several, or malformed)."""
    found = list(NUMBER.finditer(text.translate(MINUS_SIGNS)))
    return _to_fraction(found[0]) if len(found) == 1 else None


def _to_fraction(m: re.Match) -> Fraction | None:
    sign, whole, decimals, denom = m.group(1), m.group(2).replace(",", ""), m.group(3), m.group(4)
    if len(whole) + len(decimals or "") + len(denom or "") > MAX_DIGITS:
        return None
    value = Fraction(int(whole)) + (Fraction(int(decimals), 10 ** len(decimals)) if decimals else 0)
    if denom is not None:
        if decimals or int(denom) == 0:
            return None
        value /= int(denom)
    return -value if sign else value


def answer_block(text: str) -> str | None:
    """The content of the last <answer>...</answer> block."""
    blocks = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return blocks[-1] if blocks else None


def format_reward(text: str, strict: bool = True) -> float:
    """1 for exactly the answer layout; with strict=False 0.25 per tag of the largest set of tags that
    each appear once and stand in the layout's order."""
    if strict:
        return 1.0 if STRICT_FORMAT.fullmatch(text) else 0.0
    positions = [text.find(t) for t in TAGS if text.count(t) == 1]  # in the layout's order of tags
    # the longest run of these, not necessarily adjacent, whose positions increase (4 tags: O(16))
    longest = [1] * len(positions)
    for j in range(len(positions)):
        for i in range(j):
            if positions[i] < positions[j]:
                longest[j] = max(longest[j], longest[i] + 1)
    return 0.25 * max(longest, default=0)


def extract_answer(text: str) -> Fraction | None:
    block = answer_block(text)
    return None if block is None else parse_number(block)


def correct_reward(text: str, gold: Fraction) -> float:
    """1 when the <answer> block holds exactly one number equal to the gold answer."""
    return 1.0 if extract_answer(text) == gold else 0.0


def lenient_answer(text: str) -> Fraction | None:
    """The last number anywhere in the completion (for models that ignore the tags)."""
    found = list(NUMBER.finditer(text.translate(MINUS_SIGNS)))
    return _to_fraction(found[-1]) if found else None
