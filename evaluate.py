"""Greedy evaluation on GSM8K-format problems: strict accuracy with its Wilson interval, and audit records.

evaluate() samples each problem's completion with generate.py (greedy by default) and scores it with
gsm8k.py's rewards: strict accuracy is the correctness reward (exactly one number in the <answer>
block, equal to the gold answer), format_ok the strict format reward, and the lenient accuracy reads
the last number anywhere, for models that ignore the tags. It returns one record per problem
(question, gold, completion, parsed answer, verdicts), which train.py writes into the run folder, so
every reported accuracy can be audited line by line. summarise() turns records into the numbers
reported, with a 95% Wilson score interval.

Left out: pass@k, majority voting, and evaluation of other tasks.
"""

from __future__ import annotations

import math

import torch

from generate import generate
from gsm8k import Example, extract_answer, format_number, format_reward, lenient_answer, prompt_text


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[Example], *, max_new_tokens: int = 512, batch_size: int = 32,
             temperature: float = 0.0, seed: int = 0, compile: bool = False) -> list[dict]:
    """One record per problem: its completion (greedy by default) and how it scores."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    records = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        prompts = [tokenizer.encode(prompt_text(ex.question, tokenizer.chat)) for ex in batch]
        out, mask, _ = generate(model, prompts, max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids,
                                pad_id=tokenizer.pad_id, temperature=temperature, generator=gen, compile=compile)
        for ex, ids, m in zip(batch, out.tolist(), mask.sum(-1).tolist()):
            text = tokenizer.decode(ids[:m])
            parsed, lenient = extract_answer(text), lenient_answer(text)
            records.append({"index": ex.index, "question": ex.question, "gold": format_number(ex.gold),
                            "completion": text, "tokens": m,
                            "parsed": None if parsed is None else format_number(parsed),
                            "correct": parsed == ex.gold, "lenient_correct": lenient == ex.gold,
                            "format_ok": format_reward(text) == 1.0})
    return records


def summarise(records: list[dict]) -> dict:
    """Accuracy with its Wilson interval, lenient accuracy, format rate and completion lengths."""
    n = len(records)
    k = sum(r["correct"] for r in records)
    lengths = [r["tokens"] for r in records] or [0]
    return {"n": n, "correct": k, "accuracy": k / max(n, 1), "ci95": wilson_interval(k, n),
            "lenient_accuracy": sum(r["lenient_correct"] for r in records) / max(n, 1),
            "format_rate": sum(r["format_ok"] for r in records) / max(n, 1),
            "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths)}
