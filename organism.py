"""The model organism: a small Qwen2 pre-trained on multi-step arithmetic, on which GRPO really learns.

`python train.py --preset organism` (and study.py) run on it; `python organism.py` builds it alone.
It generates GSM8K-format word problems (two or three operations among +, -, *, on numbers beyond
one digit, a few phrasings), trains a byte-level BPE tokenizer on them (one token per digit, as in
Qwen2's own), builds a 16-layer Qwen2 and pre-trains it by full-parameter SFT (AdamW) on the train
problems in the study's <reasoning>/<answer> format.

Where GRPO's room comes from, by design: half of the SFT targets (`noise`) keep their reasoning but
answer one step early (the previous line's result), so the pre-trained model writes the right last
line and then, about half the time, answers the line before it. Sampling finds the right answer
where greedy decoding does not, and the correctness reward trains the habit away: measured on seed
0, greedy held-out accuracy rises from 34.8% (Wilson 30.8-39.1) to 67.2% (63.0-71.2) in 60 GRPO
steps (results/miniature/ has every seed). Without the planted habit (noise 0) an under-trained
8-layer organism left GRPO nothing it could use at these settings (18% before, 11-16% after).
train.jsonl and test.jsonl keep the right answers.

Its layers, made to look more like Qwen's in one respect: the residual stream entering layer 0 is
not much smaller than the later layers'. Pre-norm RMSNorm divides what each layer reads by the
stream's RMS, so the backward into the stream scales like 1/RMS: with tied embeddings drawn at
init_std (the 8-layer organism of earlier versions) the stream entered layer 0 at RMS 0.11 and
layers 1-7 at 3.6-9.9, and layer 0 carried ~30% of every run's gradient, at initialisation too. So
the embeddings are untied (Qwen2 allows it: tie_word_embeddings false) and drawn at std 3.0. The
RMS entering each layer (residual_rms, 64 test problems with their reference solutions), measured:
    layer  0    1    2    3    4     5     6     7     8     9     10    11    12    13    14    15   norm
    RMS   3.0  5.4  6.7  7.7  9.2  10.6  11.6  12.7  13.3  14.0  14.6  15.4  16.3  17.1  18.9  20.5  26.3
(embed_std 1.0 gave 1.0, 2.9, 4.2, ... 13.1: layer 0 still 3-10x below the rest.) The stream still
grows with depth, as in trained transformers generally; layer 0 is no longer an outlier of its own.

Built once per machine and cached in a folder keyed by a hash of the recipe (<cache>/lora-grpo/
organism-<key>: config.json, model.safetensors, tokenizer.json, train.jsonl, test.jsonl, recipe.json),
atomically, with a progress line while it trains (1600 SFT steps: README gives the time measured).
One CPU thread and fixed seeds: the same recipe gives bit-identical weights with the same PyTorch build.

Left out: division, fractions, problems whose wording needs reading twice; any skill beyond what the
study's pipeline needs to show learning.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction

import torch

import gsm8k
import logprobs
import model as qwen
import rundir
import sft
from tiny import train_tiny_tokenizer

VERSION = 1  # bump when the generator or the build changes what a recipe produces: a new cache key


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    n_train: int = 20000  # many distinct problems: 1600 x 16 SFT samples see each about once, so the
                          # model learns to compute rather than to recall answers
    n_test: int = 1000
    max_ops: int = 3  # each problem has 2..max_ops operations
    lo: int = 10  # operands of + and - are drawn from [lo, hi]
    hi: int = 30  # with 99, sums were learned far too slowly for a 10-minute build on one thread
    noise: float = 0.5  # fraction of SFT targets that answer one step early (train.jsonl stays right):
    # about half the greedy answers then repeat the previous line, which GRPO's reward trains away
    vocab_size: int = 500
    layers: int = 16
    hidden: int = 96
    intermediate: int = 256
    heads: int = 4
    kv_heads: int = 2
    sft_steps: int = 1600  # with 8 layers, 2400 steps reached 82% greedy without noise: no room left
    batch: int = 16
    lr: float = 3e-3
    init_std: float = 0.05
    tie_embeddings: bool = False
    embed_std: float | None = 3.0  # untied embeddings drawn at this std (None: init_std)

    def __post_init__(self):
        """A recipe that cannot build a working organism is refused before anything is built or cached."""
        counts = {"n_train": self.n_train, "n_test": self.n_test, "layers": self.layers, "hidden": self.hidden,
                  "intermediate": self.intermediate, "heads": self.heads, "kv_heads": self.kv_heads,
                  "sft_steps": self.sft_steps, "batch": self.batch}
        if bad := [f"{k}={v}" for k, v in counts.items() if v < 1]:
            raise ValueError(f"Recipe: {', '.join(bad)}: must be >= 1")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"Recipe: hidden ({self.hidden}) must divide by heads ({self.heads}) and heads by "
                             f"kv_heads ({self.kv_heads})")
        if self.init_std <= 0 or (self.embed_std is not None and self.embed_std <= 0):
            raise ValueError(f"Recipe: init_std ({self.init_std}) and embed_std ({self.embed_std}) must be > 0")
        if self.tie_embeddings and self.embed_std is not None:
            raise ValueError("Recipe: embed_std needs tie_embeddings=False (a tied lm_head would share its scale); "
                             "with tied embeddings set embed_std to None (--embed-std none)")
        if not 0.0 <= self.noise <= 1.0 or self.lr <= 0 or self.max_ops < 2 or not 1 <= self.lo <= self.hi // 2:
            raise ValueError(f"Recipe: need 0 <= noise <= 1, lr > 0, max_ops >= 2 and 1 <= lo <= hi/2; got noise="
                             f"{self.noise}, lr={self.lr}, max_ops={self.max_ops}, lo={self.lo}, hi={self.hi}")

    def key(self) -> str:
        """12 hex digits of the recipe (and VERSION): the cache folder's name."""
        text = json.dumps({"version": VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


NAMES = ["Ann", "Ben", "Cal", "Dee", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon"]
THINGS = ["apples", "books", "coins", "pens", "stamps", "marbles", "cards", "shells"]
CONTAINERS = ["boxes", "bags", "packs", "jars"]


def problem(rng: random.Random, recipe: Recipe) -> tuple[str, str, int]:
    """(question, GSM8K-style solution with <<a op b=c>> annotations and '#### N', answer) of one problem."""
    who, other = rng.sample(NAMES, 2)
    what = rng.choice(THINGS)
    lines = []

    def step(a: int, op: str, b: int) -> int:
        c = {"+": a + b, "-": a - b, "*": a * b}[op]
        lines.append(f"{a} {op} {b} = <<{a}{op}{b}={c}>>{c}")
        return c

    if rng.random() < 0.5:  # start with a product: k containers of n things
        k, n = rng.randint(2, 9), rng.randint(recipe.lo, recipe.hi // 2)
        sentences = [f"{who} buys {k} {rng.choice(CONTAINERS)} with {n} {what} in each."]
        value = step(k, "*", n)
    else:
        value = rng.randint(recipe.lo, recipe.hi)
        sentences = [f"{who} has {value} {what}."]
    n_ops = rng.randint(2, recipe.max_ops)
    while len(lines) < n_ops:
        # one product per problem, of a number still in two digits: answers stay within three digits
        op = rng.choice("+-*" if value <= recipe.hi and not any(" * " in x for x in lines) else "+-")
        if op == "-" and value < recipe.lo:
            continue  # nothing left to take away: draw another operation
        if op == "*":
            b = rng.randint(2, 5)
            sentences.append(rng.choice([f"Then {who} ends up with {b} times as many {what}.",
                                         f"Then the number of {what} grows {b} times."]))
        elif op == "+":
            b = rng.randint(recipe.lo, recipe.hi)
            sentences.append(rng.choice([f"{other} gives {who} {b} more.", f"{who} finds {b} more {what}.",
                                         f"Then {who} buys {b} more {what}."]))
        else:
            b = rng.randint(recipe.lo, min(recipe.hi, value))
            sentences.append(rng.choice([f"{who} gives {b} {what} to {other}.", f"{who} loses {b} of them.",
                                         f"Then {who} sells {b} {what}."]))
        value = step(value, op, b)
    ask = [f"How many {what} does {who} have now?"] + ([f"How many {what} are left?"] if op == "-" else [])
    sentences.append(rng.choice(ask))
    solution = "\n".join(lines) + f"\n#### {value}"
    return " ".join(sentences), solution, value


def problems(recipe: Recipe) -> tuple[list[gsm8k.Example], list[gsm8k.Example]]:
    """(train, test): distinct questions (deduplicated by text), seeded, the first n_test drawn go to test."""
    rng = random.Random(f"organism-problems-{recipe.seed}")
    seen, drawn = set(), []
    while len(drawn) < recipe.n_train + recipe.n_test:
        q, sol, ans = problem(rng, recipe)
        if q not in seen:
            seen.add(q)
            drawn.append((q, sol, ans))
    split = {"test": drawn[:recipe.n_test], "train": drawn[recipe.n_test:]}
    train, test = ([gsm8k.Example(i, q, s, Fraction(a)) for i, (q, s, a) in enumerate(split[name])]
                   for name in ("train", "test"))
    return train, test


def stops_early(ex: gsm8k.Example) -> gsm8k.Example:
    """The same reasoning, but the answer is the result of the line before the last: a bad habit that
    sampling sometimes avoids and the correctness reward can train away."""
    body = ex.solution.rsplit("####", 1)[0]
    previous = int(re.findall(r"=(\d+)>>", body)[-2])
    return gsm8k.Example(ex.index, ex.question, f"{body}#### {previous}", Fraction(previous))


def write_jsonl(path: str, examples: list[gsm8k.Example]):
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps({"question": ex.question, "answer": ex.solution}) + "\n")


def pretrain(recipe: Recipe, tok: qwen.Tokenizer, train: list[gsm8k.Example], log=print) -> qwen.Qwen2:
    """Random init, then recipe.sft_steps of full-parameter SFT (AdamW, token-mean cross-entropy)."""
    cfg = qwen.ModelConfig(vocab_size=tok.tok.get_vocab_size(), hidden_size=recipe.hidden,
                           intermediate_size=recipe.intermediate, num_hidden_layers=recipe.layers,
                           num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
                           max_position_embeddings=512, rope_theta=10000.0,
                           tie_word_embeddings=recipe.tie_embeddings)
    torch.manual_seed(recipe.seed)
    m = qwen.Qwen2(cfg)
    gen = torch.Generator().manual_seed(recipe.seed)
    m.init_weights(std=recipe.init_std, generator=gen)
    if recipe.embed_std is not None:  # untied (Recipe checks it)
        with torch.no_grad():
            m.model.embed_tokens.weight.normal_(0.0, recipe.embed_std, generator=gen)
    opt = torch.optim.AdamW(m.parameters(), lr=recipe.lr, weight_decay=0.0)
    # linear warm-up, then cosine to 10%: a short run still ends on small, stable updates
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (
        0.1 + 0.45 * (1 + torch.cos(torch.tensor(s / recipe.sft_steps * torch.pi)).item())))
    rng = random.Random(f"organism-sft-{recipe.seed}")
    targets = [stops_early(ex) if rng.random() < recipe.noise else ex for ex in train]
    m.train()
    t0 = time.perf_counter()
    for step in range(recipe.sft_steps):
        ids, attn, mask = sft.sft_batch(tok, rng.sample(targets, recipe.batch), "cpu")
        logp, _ = logprobs.completion_logprobs(m, ids, attn, mask.shape[1])
        loss = -torch.where(mask, logp, 0.0).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0 or step + 1 == recipe.sft_steps:
            sec = (time.perf_counter() - t0) / (step + 1)
            log(f"organism sft {step + 1}/{recipe.sft_steps} | loss {loss.item():.4f} | {sec:.2f}s/step | "
                f"ETA {sec * (recipe.sft_steps - step - 1):.0f}s")
    return m.eval()


def residual_rms(m: qwen.Qwen2, tok: qwen.Tokenizer, examples: list[gsm8k.Example]) -> list[float]:
    """RMS of the residual stream entering each decoder layer (then the final norm's input), over the
    real tokens of these prompts + reference completions: how large the stream is that each layer's
    pre-norm divides by, and so how strongly the backward is scaled there."""
    ids, attn, _ = sft.sft_batch(tok, examples, "cpu")
    seen = []
    hooks = [mod.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
             for mod in [*m.model.layers, m.model.norm]]
    try:
        with torch.no_grad():
            m(ids, attn)
    finally:
        for h in hooks:
            h.remove()
    real = attn.bool()
    return [x[real].pow(2).mean().sqrt().item() for x in seen]


def default_root() -> str:
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "lora-grpo")


MANIFEST = "manifest.json"  # sha256 of every other file, written last: a folder without it is unfinished


def _sha256s(folder: str) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name != MANIFEST and os.path.isfile(os.path.join(folder, name))}


def verified(folder: str) -> str | None:
    """Why the cached folder cannot be trusted (None when every file matches its manifest). A folder
    built before manifests existed gets one now if its weights open whole."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        try:
            from safetensors import safe_open
            with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)[:]  # every tensor readable: the file is not truncated
        except Exception as e:
            return f"model.safetensors does not open ({' '.join(str(e).split())[:120]})"
        rundir.atomic_json(path, _sha256s(folder))
        return None
    try:
        expected = json.load(open(path))
    except ValueError:
        expected = None
    if not isinstance(expected, dict):
        return f"{MANIFEST} is not a manifest"
    found = _sha256s(folder)
    bad = sorted(n for n in set(expected) | set(found) if expected.get(n) != found.get(n))
    return f"{', '.join(bad)} differ{'s' if len(bad) == 1 else ''} from {MANIFEST}" if bad else None


def build(recipe: Recipe = Recipe(), root: str | None = None, log=print) -> str:
    """The organism's folder for `recipe` under `root`, built unless it is already there (and verified).

    Builds are serialised by a lock beside the folder: a second build of the same recipe waits for the
    first and then uses its result. Each build writes into a private temporary folder renamed into
    place at the end, so a build killed half-way leaves nothing that looks finished."""
    root = root or default_root()
    folder = os.path.join(root, f"organism-{recipe.key()}")
    os.makedirs(root, exist_ok=True)
    with open(folder + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this block ends, or when the process dies
        if os.path.isdir(folder):
            if why := verified(folder):
                raise ValueError(f"{folder}: the cached organism is damaged ({why}); delete this folder and run "
                                 f"again to rebuild it")
            return folder
        log(f"building the model organism once for this machine ({recipe.sft_steps} SFT steps of a {recipe.layers}-"
            f"layer model on one thread; the progress line gives the ETA) into {folder}")
        train, test = problems(recipe)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one summation order whatever the machine: the same recipe, the same bits
        try:
            chat = qwen.Tokenizer.chat
            texts = [gsm8k.prompt_text(ex.question, chat) + gsm8k.reference_completion(ex) for ex in train]
            # BPE trained without digits learns no merges of them: one token per digit, as in Qwen2's own
            # tokenizer, so that "132" and "13" share their digits' tokens and the sums are learnable
            digitless = [re.sub(r"[0-9]", "", t) for t in texts]
            tok = qwen.Tokenizer(train_tiny_tokenizer(digitless, vocab_size=recipe.vocab_size))
            m = pretrain(recipe, tok, train, log)
        finally:
            torch.set_num_threads(threads)
        for stale in glob.glob(folder + ".tmp-*"):  # left by a build killed half-way (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=root)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep other users from a shared cache
        try:
            qwen.save_pretrained(m, tmp)
            tok.tok.save(os.path.join(tmp, "tokenizer.json"))
            write_jsonl(os.path.join(tmp, "train.jsonl"), train)
            write_jsonl(os.path.join(tmp, "test.jsonl"), test)
            rundir.atomic_json(os.path.join(tmp, "recipe.json"), {"version": VERSION, **dataclasses.asdict(recipe)})
            rundir.atomic_json(os.path.join(tmp, MANIFEST), _sha256s(tmp))  # last
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv=None):
    """`python organism.py [--root DIR] [--FIELD VALUE ...]`: build or find the organism, print its folder."""
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help=f"cache root (default {default_root()})")
    for f in dataclasses.fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            optional_float = lambda v: None if v.lower() == "none" else float(v)
            ap.add_argument(flag, type=optional_float if f.type == "float | None" else type(f.default),
                            default=f.default)
    args = vars(ap.parse_args(argv))
    root = args.pop("root")
    t0 = time.perf_counter()
    try:
        folder = build(Recipe(**args), root, log=lambda s: print(s, file=sys.stderr, flush=True))  # checks first
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    print(folder)


if __name__ == "__main__":
    main()
