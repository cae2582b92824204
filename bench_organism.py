"""The whole organism run, train.py against TRL's GRPOTrainer + PEFT, and where one of its steps' time goes.

    python bench.py --organism [--seeds 3] [--jobs 2] [--baseline DIR] [--json FILE]
    python bench.py --organism-step

bench.py measures pieces (sampling, the learn step, one GRPO step) at fixed shapes; this measures what
a user choosing between the two stacks asks: how long the same training takes, and whether it reaches
the same accuracy. The organism preset is trained `--seeds` times by each side, each run a one-thread
process, `--jobs` at a time, and every adapter is scored by our greedy evaluation (evaluate.py) on the
same held-out problems. What both sides share and what differs is listed in BENCH.md. `--baseline DIR`
adds the train.py of another checkout (an earlier commit) for a before/after ratio; `--organism-step`
splits one step of the organism's run into its phases.

Left out: TRL with vLLM or on a GPU; runs of the full study (Qwen2.5-1.5B).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

import torch

import config
import evaluate
import grpo
import gsm8k
import logprobs as LP
import lora
import model as M
import organism
import rundir
import stats
import tiny
from profiler import GradientProfiler

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")

ORGANISM_KEYS = ("train_s", "wall_s", "tokens_per_s", "peak_rss_bytes", "accuracy")


def runs(args) -> dict:
    """The organism preset trained `--seeds` times by train.py and by TRL's GRPOTrainer + PEFT (and by
    the train.py of `--baseline`, another checkout, when given), each run a one-thread process, `--jobs`
    at a time in the order ours, TRL, ours, ...; both adapters are scored by our greedy evaluation on
    the same 500 problems. Returns each run's figures and their means per side."""
    here = os.path.dirname(os.path.abspath(__file__))
    sides = ["ours"] + (["trl"] if "trl" not in args.skip else []) + (["baseline"] if args.baseline else [])
    jobs = [(side, seed) for seed in range(args.seeds) for side in sides]
    if args.preset == "organism":
        organism.build(log=lambda m: print(m, flush=True))  # once, before any run (a fresh machine builds it)

    def one(job, tmp: str):
        side, seed = job
        out = os.path.join(tmp, f"{side}-{seed}")
        if side == "trl":
            cmd = [sys.executable, BENCH, "--child", "organism-trl", "--seed", str(seed),
                   "--model-dir", out, "--preset", args.preset]
        else:
            code = here if side == "ours" else os.path.abspath(args.baseline)
            cmd = [sys.executable, os.path.join(code, "train.py"), "--preset", args.preset, "--seed", str(seed),
                   "--out", out]
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=here if side != "baseline" else os.path.abspath(args.baseline),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        text = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # its own peak memory (ru_maxrss), which Popen.wait drops
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{side} seed {seed} failed:\n{text[-3000:]}")
        if side == "trl":
            r = json.loads(text.strip().splitlines()[-1])
        else:
            with open(os.path.join(out, "results.json")) as f:
                res = json.load(f)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                steps = [json.loads(line) for line in f]
            r = {"train_s": sum(m["time_step"] for m in steps), "tokens": res["train_tokens"],
                 "accuracy": res["accuracy"], "correct": res["correct"], "n": res["n"],
                 "eval_s": res.get("time_eval_s"),
                 "phases_s": {k: sum(m[f"time_{k}"] for m in steps) for k in ("sample", "score", "learn")}}
        r.update(side=side, seed=seed, wall_s=wall, peak_rss_bytes=usage.ru_maxrss * 1024,
                 tokens_per_s=r["tokens"] / r["train_s"])
        print(f"organism  {side:8s} seed {seed}: train {r['train_s']:6.1f} s, whole run {wall:6.1f} s, "
              f"accuracy {r['accuracy']:.3f}, peak {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
        return r

    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda job: one(job, tmp), jobs))
    res = {"runs": done, "seeds": args.seeds, "jobs": args.jobs}
    for side in sides:
        mine = [r for r in done if r["side"] == side]
        res[side] = {k: statistics.mean(r[k] for r in mine) for k in ORGANISM_KEYS}
        k, n = sum(r["correct"] for r in mine), sum(r["n"] for r in mine)
        res[side]["accuracy_sd"] = statistics.stdev(r["accuracy"] for r in mine) if len(mine) > 1 else 0.0
        res[side]["wilson_pooled"] = evaluate.wilson_interval(k, n)
    if "trl" in res:
        res["speedup_vs_trl"] = res["trl"]["train_s"] / res["ours"]["train_s"]
        res["speedup_vs_trl_wall"] = res["trl"]["wall_s"] / res["ours"]["wall_s"]
        res["accuracy_vs_trl"] = accuracy_difference([r["accuracy"] for r in done if r["side"] == "ours"],
                                                     [r["accuracy"] for r in done if r["side"] == "trl"])
    if args.baseline:
        res["speedup_vs_baseline_wall"] = res["baseline"]["wall_s"] / res["ours"]["wall_s"]
        res["speedup_vs_baseline_train"] = res["baseline"]["train_s"] / res["ours"]["train_s"]
    return res


def accuracy_difference(ours: list[float], theirs: list[float]) -> dict:
    """Ours minus theirs over seeds, unpaired (the two sides draw different random streams): the mean,
    Welch's 95% interval, and the difference a two-sided test would find with 80% power at this spread."""
    if min(len(ours), len(theirs)) < 2:
        return {"mean": statistics.mean(ours) - statistics.mean(theirs)}
    va, vb = statistics.variance(ours) / len(ours), statistics.variance(theirs) / len(theirs)
    se = math.sqrt(va + vb)
    df = max(1, int((va + vb) ** 2 / (va ** 2 / (len(ours) - 1) + vb ** 2 / (len(theirs) - 1))))  # Welch, floored
    mean = statistics.mean(ours) - statistics.mean(theirs)
    half = stats.t_ppf(0.975, df) * se
    return {"mean": mean, "ci95": (mean - half, mean + half), "df": df,
            "detectable": (stats.t_ppf(0.975, df) + stats.t_ppf(0.8, df)) * se}


def step_profile(args) -> dict:
    """Where one organism GRPO step's time goes (the preset: 8 prompts x 8 samples, r = 8, one thread):
    sampling, the learn step's forward and backward (on shared prompts cut per micro-batch, and on the
    whole padded sequences the learn step ran before, interleaved on the same rollout), the optimiser,
    the profiler, one batch of the final evaluation, and padding: positions computed per token that
    counts (each prompt once, each completion's real tokens)."""
    torch.set_num_threads(1)
    cfg, _ = config.parse_args(["--preset", "organism"])
    folder = organism.build(log=lambda m: print(m, flush=True))
    tok, model = M.load_tokenizer(folder), M.from_pretrained(folder)
    model.requires_grad_(False)
    torch.manual_seed(0)
    lora.apply_lora(model, r=cfg.rank, alpha=cfg.alpha)
    train_set, test_set = config.load_data(cfg)
    examples = gsm8k.step_problems(train_set, 0, 0, cfg.prompts_per_step)
    prompts = [tok.encode(gsm8k.prompt_text(ex.question, tok.chat)) for ex in examples]
    gcfg = config.sub_config(grpo.GRPOConfig, cfg)
    rewards = {"correct": lambda text, ex: gsm8k.correct_reward(text, ex.gold),
               "format": lambda text, ex: gsm8k.format_reward(text, cfg.format_strict)}
    weights = {"correct": cfg.reward_correct, "format": cfg.reward_format}
    batch = grpo.rollout(model, tok, prompts, examples, rewards, weights, gcfg, torch.Generator().manual_seed(0))
    N, Tc = batch.ids.shape
    adv = torch.randn(N, generator=torch.Generator().manual_seed(1))
    ids, attn = batch.sequences()
    chunks = grpo.micro_batches(N, gcfg.micro_batch)
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=cfg.lr)
    prof = GradientProfiler(model)

    def learn(shared: bool) -> tuple[float, float]:
        fwd = bwd = 0.0
        for s in chunks:
            t = time.perf_counter()
            logp = (grpo.logprobs(model, batch, s, False, 1.0)[0] if shared
                    else LP.completion_logprobs(model, ids[s], attn[s], Tc)[0])
            loss = -(logp * adv[s, None] * batch.mask[s]).sum() / N
            t1 = time.perf_counter()
            loss.backward()
            fwd, bwd = fwd + t1 - t, bwd + time.perf_counter() - t1
        return fwd, bwd

    def rest() -> tuple[float, float]:  # (profiler, optimiser) seconds
        t = time.perf_counter()
        prof.record()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t, time.perf_counter() - t1

    def sample() -> float:
        t = time.perf_counter()
        grpo.rollout(model, tok, prompts, examples, rewards, weights, gcfg, torch.Generator().manual_seed(0))
        return time.perf_counter() - t

    times = {"shared": [], "whole": [], "rest": [], "sample": []}
    for _ in range(args.repeats):
        times["sample"].append(sample())
        for way in ("shared", "whole"):
            times[way].append(learn(way == "shared"))
            times["rest"].append(rest())
    res = {"sample_s": statistics.median(times["sample"])}
    for way in ("shared", "whole"):
        res[f"learn_{way}_forward_s"] = statistics.median(f for f, _ in times[way])
        res[f"learn_{way}_backward_s"] = statistics.median(b for _, b in times[way])
    res["profiler_s"] = statistics.median(p for p, _ in times["rest"])
    res["optimizer_s"] = statistics.median(o for _, o in times["rest"])
    K = cfg.num_generations
    real = int(batch.prompt_attn.sum()) + int(batch.attn.sum())
    computed = 0
    for s in chunks:
        g = slice(s.start // K, (s.stop - 1) // K + 1)
        tp = int(batch.prompt_attn[g].any(0).sum())
        computed += (g.stop - g.start) * tp + (s.stop - s.start) * int(batch.attn[s].sum(-1).max())
    res["positions_per_token_shared"] = computed / real
    res["positions_per_token_whole"] = N * ids.shape[1] / real
    problems = gsm8k.subset(test_set, cfg.eval_batch)
    t = time.perf_counter()
    with lora.merged(model):
        evaluate.evaluate(model, tok, problems, max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch)
    res["eval_batch_s"] = time.perf_counter() - t
    for k, v in res.items():
        print(f"{k:32s} {v:8.3f}")
    if args.json:
        rundir.atomic_json(args.json, {"organism_step": res})
    return res


def main(args) -> dict:
    """`bench.py --organism`: runs()' table, and its means under the JSON keys BENCH.md quotes."""
    if args.seeds < 1 or args.jobs < 1:
        raise SystemExit(f"error: --seeds ({args.seeds}) and --jobs ({args.jobs}) must be >= 1")
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "train.py")):
        raise SystemExit(f"error: --baseline {args.baseline}: no train.py there (a checkout of this project)")
    if "trl" not in args.skip and importlib.util.find_spec("trl") is None:
        raise SystemExit("error: --organism needs TRL (pip install -r requirements-dev.txt), or --skip trl")
    o = runs(args)
    result = {"organism": o, "organism_train_s": o["ours"]["train_s"], "organism_accuracy": o["ours"]["accuracy"],
              "env": {"torch": torch.__version__, "python": platform.python_version(),
                      "date": time.strftime("%Y-%m-%d")}}
    if "trl" in o:
        result.update(organism_train_s_trl=o["trl"]["train_s"], organism_speedup_vs_trl=o["speedup_vs_trl"],
                      organism_accuracy_trl=o["trl"]["accuracy"])
    print(f"\n{'side':10s} {'train s':>8s} {'run s':>8s} {'tokens/s':>9s} {'peak MiB':>9s} {'accuracy':>9s} "
          f"(sd over seeds)")
    for side in ("ours", "trl", "baseline"):
        if side in o:
            x = o[side]
            print(f"{side:10s} {x['train_s']:8.1f} {x['wall_s']:8.1f} {x['tokens_per_s']:9.0f} "
                  f"{x['peak_rss_bytes'] / 2**20:9.0f} {x['accuracy']:9.3f} ({x['accuracy_sd']:.3f})")
    if "trl" in o:
        print(f"training {o['speedup_vs_trl']:.2f}x faster than TRL + PEFT (whole runs "
              f"{o['speedup_vs_trl_wall']:.2f}x)")
        d = o["accuracy_vs_trl"]
        if "ci95" in d:
            print(f"accuracy, ours minus TRL's over seeds: {100 * d['mean']:+.1f} points, 95% interval "
                  f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]; detectable at this spread: "
                  f"{100 * d['detectable']:.1f}")
    if args.baseline:
        print(f"whole runs {o['speedup_vs_baseline_wall']:.2f}x faster than the baseline's (training "
              f"{o['speedup_vs_baseline_train']:.2f}x)")
    if args.json:
        rundir.atomic_json(args.json, result)
    return result


def trl_child(args):
    """`bench.py --child organism-trl`: the organism preset's run with TRL's GRPOTrainer + PEFT (every setting that
    both have, aligned; BENCH.md lists what differs), then our evaluation of its adapter; prints one
    JSON line."""

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    cfg, _ = config.parse_args(["--preset", args.preset, "--seed", str(args.seed)])
    folder = (organism.build() if args.preset == "organism"
              else tiny.build_tiny_model(os.path.join(args.model_dir, "model")))
    tok = M.load_tokenizer(folder)
    train_set, test_set = config.load_data(cfg)
    B, K = cfg.prompts_per_step, cfg.num_generations
    examples = [ex for step in range(cfg.steps) for ex in gsm8k.step_problems(train_set, cfg.seed, step, B)]
    data = Dataset.from_list([{"prompt": gsm8k.prompt_text(ex.question, tok.chat), "gold": str(ex.gold)}
                              for ex in examples])
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                     eos_token="<|im_end|>", pad_token="<|endoftext|>")
    for row in data.select(range(B)):  # the same prompt tokens, or the comparison means nothing
        assert hf_tok(row["prompt"], add_special_tokens=False).input_ids == tok.encode(row["prompt"])
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.stop_ids, tok.pad_id
    model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                             target_modules=list(lora.TARGETS)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: config.lr_factor(cfg, step))

    def correct(completions, gold, **_):
        return [gsm8k.correct_reward(c, Fraction(g)) for c, g in zip(completions, gold)]

    def fmt(completions, **_):
        return [gsm8k.format_reward(c, cfg.format_strict) for c in completions]

    trl_cfg = GRPOConfig(output_dir=os.path.join(args.model_dir, "trl"), per_device_train_batch_size=cfg.micro_batch,
                         gradient_accumulation_steps=B * K // cfg.micro_batch, num_generations=K,
                         max_completion_length=cfg.max_new_tokens, max_steps=cfg.steps, learning_rate=cfg.lr,
                         max_grad_norm=cfg.max_grad_norm, beta=cfg.beta, epsilon=cfg.eps_low,
                         epsilon_high=cfg.eps_high, loss_type=cfg.loss_type,
                         scale_rewards="group" if cfg.scale_rewards else "none", temperature=cfg.temperature,
                         top_p=cfg.top_p, mask_truncated_completions=cfg.mask_truncated,
                         reward_weights=[cfg.reward_correct, cfg.reward_format], shuffle_dataset=False,
                         seed=cfg.seed, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                         disable_tqdm=True,
                         # TRL's own defaults differ from the Trainer's: checkpointing and bf16 autocast on,
                         # which our run has off (fp32, nothing recomputed)
                         gradient_checkpointing=False, bf16=False)
    assert not (trl_cfg.gradient_checkpointing or trl_cfg.bf16 or trl_cfg.fp16), "TRL must run as ours: fp32, no recompute"
    trainer = GRPOTrainer(model=model, reward_funcs=[correct, fmt], args=trl_cfg, train_dataset=data,
                          processing_class=hf_tok, optimizers=(opt, sched))
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    adapter = os.path.join(args.model_dir, "adapter")
    model.save_pretrained(adapter)
    ours = M.from_pretrained(folder)
    lora.load_adapter(ours, adapter)
    t = time.perf_counter()
    with lora.merged(ours):
        records = evaluate.evaluate(ours, tok, gsm8k.subset(test_set, cfg.eval_n),
                                    max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch)
    res = evaluate.summarise(records)
    print(json.dumps({"train_s": train_s, "eval_s": time.perf_counter() - t, "accuracy": res["accuracy"],
                      "correct": res["correct"], "n": res["n"], "steps": len(logs),
                      "tokens": round(sum(h["completions/mean_length"] * B * K for h in logs)),
                      "reward": [h.get("reward") for h in logs]}))
