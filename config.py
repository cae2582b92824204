"""The run's settings: one dataclass with every flag, its default and why, the presets, the command
line built from it, and the checks that turn a bad setting into a one-line error before anything is
built or written. train.py runs what this file describes.

Defaults are the study's where it states them (Qwen2.5-1.5B-Instruct, 1000 steps of 4 prompts x 4
completions, LoRA r=32 on all 7 projections); every other value is a flag whose help says why.

It also resolves what the settings imply before a model is built: the thread count, the data, the
profile source of proportional/reduced, and the rank pattern. Left out: config files other than a run's own
config.json (--config), and config inheritance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

import allocate
import grpo
import gsm8k
import lora
import model as qwen
import organism
import rundir
import tiny

STRATEGIES = ("base", "uniform", "proportional", "random", "reduced", "dynamic")
TINY_MODEL = "tiny"  # --preset tiny's model: built by tiny.py into the run folder
ORGANISM_MODEL = "organism"  # --preset organism's model: built once per machine by organism.py, cached
# flags that may change when a run is resumed: how long and how it runs, never what it trains
# what train.py records in config.json beside the settings (read back by nothing but a reader)
RECORDED = ("model_path", "torch")
RESUMABLE = ("steps", "stop_after", "checkpoint_every", "threads", "eval_batch", "compile", "device")
ALGOS = ("grpo", "sft")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- what to run
    strategy: str = opt("uniform", f"rank allocation: {'|'.join(STRATEGIES)}")
    algo: str = opt("grpo", "grpo (the study) | sft (the same LoRA on the reference solutions, for comparison)")
    model: str = opt("Qwen/Qwen2.5-1.5B-Instruct", "Hub repo id or local folder of a Qwen2 checkpoint")
    data: str | None = opt(None, "folder with GSM8K {train,test}.jsonl (default: download the original release); "
                                 "checked against the release's sha256")
    data_unverified: bool = opt(False, "accept --data files that differ from the GSM8K release (your own data)")
    preset: str | None = opt(None, "tiny: the pipeline in seconds, offline on a CPU (its numbers mean nothing) | "
                                   "organism: the CPU model organism (organism.py), on which GRPO really learns (it "
                                   "removes a habit planted in the organism's pre-training)")
    out: str | None = opt(None, "run folder (default runs/<strategy>-<timestamp>)")
    seed: int = opt(0, "seed of everything: data order, sampling, LoRA init, random allocation")
    seeds: str | None = opt(None, "comma-separated seeds: one run per seed, in <out>/seed<N>")
    # --- LoRA and the rank budget
    rank: int = opt(32, "uniform rank r0; the budget is layers x r0 unless --budget is given")
    budget: int | None = opt(None, "total of per-layer ranks (default layers x rank = 896 on Qwen2.5-1.5B)")
    alpha: float = opt(64.0, "LoRA alpha (2 x r0, the common choice; the study does not state it)")
    scale_policy: str = opt("fixed", "fixed (alpha/r, PEFT's default) | constant (alpha/r0) | rslora (alpha/sqrt r)")
    dropout: float = opt(0.0, "LoRA dropout (0: GRPO's log-prob ratios should not see dropout noise)")
    r_min: int | None = opt(None, "lower rank bound (default by strategy: 20/16/12 at r0=32)")
    r_max: int | None = opt(None, "upper rank bound (default by strategy: 40/48/32 at r0=32)")
    fraction: float = opt(0.7, "budget fraction of the reduced strategy")
    profile: str | None = opt(None, "finished uniform run (same algo, model, preset) whose profile drives "
                                    "proportional/reduced (default: the newest under runs/)")
    any_profile: bool = opt(False, "accept a --profile run that is not a finished uniform run of this "
                                   "algo/model/preset")
    normalised_profile: bool = opt(False, "allocate from rank-normalised instead of raw gradient shares")
    rank_pattern: str | None = opt(None, "JSON file {module path: rank} (e.g. from allocate.py), replaces the strategy")
    # --- dynamic allocation (see dynamic.py)
    dynamic_every: int = opt(50, "dynamic: steps between rank moves")
    dynamic_t_init: int = opt(100, "dynamic: no move before this step")
    dynamic_t_final: int = opt(800, "dynamic: no move after this step")
    dynamic_window: int = opt(50, "dynamic: profiled steps that estimate importance")
    dynamic_normalised: bool = opt(True, "dynamic: rank-normalised importance (--no-dynamic-normalised: raw)")
    # --- GRPO (unstated in the study: common GRPO-on-GSM8K values, each a flag)
    steps: int = opt(1000, "optimisation steps (the study: 1000)")
    prompts_per_step: int = opt(4, "prompts per step (the study: 4)")
    num_generations: int = opt(4, "completions per prompt, K (the study: 4)")
    max_new_tokens: int = opt(512, "completion length cap: GSM8K reasoning fits in 512 for Qwen2.5-1.5B")
    temperature: float = opt(1.0, "sampling temperature T; the learner's log-probs use the same softmax(logits/T)")
    top_p: float = opt(1.0, "nucleus sampling (1.0: off); the learner does not correct for the truncation, as in TRL")
    is_cap: float = opt(3.0, "cap of the per-token importance weight pi_old/pi_sampler for the sampler-learner "
                             "mismatch (bf16 merged sampling; TRL's C_max); 0: off")
    lr: float = opt(1e-5, "peak learning rate (LoRA GRPO recipes use 5e-6 to 2e-5)")
    warmup_steps: int = opt(50, "linear warm-up steps")
    lr_schedule: str = opt("cosine", "constant | cosine (to 10% of the peak)")
    weight_decay: float = opt(0.1, "AdamW weight decay on the adapters")
    beta: float = opt(0.04, "KL weight (DeepSeekMath's 0.04)")
    eps_low: float = opt(0.2, "lower clip range")
    eps_high: float = opt(0.2, "upper clip range (DAPO raises it to 0.28)")
    loss_type: str = opt("grpo", "grpo | dapo | dr_grpo (see grpo.py)")
    scale_rewards: bool = opt(True, "divide advantages by the group std (off: Dr. GRPO)")
    num_iterations: int = opt(1, "optimiser passes per sampled batch")
    mask_truncated: bool = opt(False, "exclude completions that hit max_new_tokens from the loss")
    micro_batch: int = opt(4, "sequences per forward/backward (lower it on out-of-memory)")
    grad_checkpointing: bool = opt(False, "recompute activations in backward (less memory, ~30% slower)")
    compile: str = opt("auto", "torch.compile the decode step: auto (on with CUDA, as a CUDA graph) | on | off")
    max_grad_norm: float = opt(1.0, "gradient-norm clip (0: off)")
    reward_correct: float = opt(1.0, "weight of the correctness reward")
    reward_format: float = opt(0.5, "weight of the format reward")
    format_strict: bool = opt(False, "strict format reward instead of partial credit (0.25 per tag)")
    # --- evaluation and bookkeeping
    eval_n: int | None = opt(None, "test problems for the final evaluation (default all 1,319); a subset is drawn "
                                   "with gsm8k.EVAL_SEED, the same for every training seed")
    eval_every: int = opt(0, "evaluate every N steps on --eval-every-n problems (0: final only)")
    eval_every_n: int = opt(200, "problems in each periodic evaluation")
    eval_max_new_tokens: int = opt(512, "completion cap in evaluation")
    eval_batch: int = opt(64, "evaluation batch size")
    checkpoint_every: int = opt(50, "steps between checkpoints")
    stop_after: int | None = opt(None, "stop (with a checkpoint) after this many steps of this invocation")
    device: str | None = opt(None, "cuda | cpu (default: cuda when present)")
    dtype: str | None = opt(None, "bf16 | fp32: the frozen weights' precision (default: bf16 on CUDA, fp32 on the "
                                  "CPU); adapters, their optimiser and log-probs are fp32 either way")
    threads: int | None = opt(None, "CPU threads (default: OMP_NUM_THREADS when set, else 1 with a preset, whose "
                                    "small operations only lose time to more threads on a busy machine, else "
                                    "PyTorch's default)")


PRESETS = {
    "tiny": dict(model=TINY_MODEL, steps=12, prompts_per_step=4, num_generations=4, max_new_tokens=32, rank=8,
                 alpha=16.0, lr=2e-3, warmup_steps=1, eval_n=32, eval_every=6, eval_every_n=8, eval_max_new_tokens=32,
                 eval_batch=32, checkpoint_every=4, device="cpu", dynamic_every=3, dynamic_t_init=3,
                 dynamic_t_final=9, dynamic_window=3),
    # one run, evaluation included, takes about 1.7 minutes on one CPU thread (BENCH.md); beta 0:
    # no KL term and no reference pass (the step line prints "kl off"), as in DAPO and Dr. GRPO;
    # micro-batches of 32 (4 prompts' completions): the learn step's fastest on one thread (BENCH.md)
    "organism": dict(model=ORGANISM_MODEL, steps=60, prompts_per_step=8, num_generations=8, max_new_tokens=64,
                     rank=8, alpha=16.0, lr=2e-3, warmup_steps=5, lr_schedule="constant", beta=0.0, micro_batch=32,
                     eval_n=500, eval_every=0, eval_max_new_tokens=64, eval_batch=100, checkpoint_every=20,
                     device="cpu", dynamic_every=10, dynamic_t_init=10, dynamic_t_final=40, dynamic_window=10),
}


# ------------------------------------------------------------------------------------------ set-up

USAGE = """Fine-tune LoRA adapters on a Qwen2 model with GRPO (or SFT) on GSM8K, record every adapter's
gradient norm at every step, and evaluate the result; one run folder holds it all (README.md).
Defaults are the study's (Qwen2.5-1.5B-Instruct, 1000 steps, r = 32 everywhere); --preset organism
trains the CPU model organism offline and --preset tiny runs the pipeline in seconds."""

def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help strings
        if f.type == "bool":
            text += f" [default: {'on' if f.default else 'off'}]"
            ap.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            text += f" [default: {f.default}]" if f.default is not None else ""
            kind = {"int": int, "float": float, "int | None": int}.get(f.type, str)
            ap.add_argument(flag(f.name), type=kind, default=None, help=text)
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    ap.add_argument("--config", metavar="FILE", help="start from a run's saved config.json (flags override it)")
    ap.add_argument("--plan", action="store_true", help="print the predicted memory of one step, phase by phase "
                    "(plan.py), and exit: needs only the model's config.json; the device defaults to cuda")
    ap.add_argument("--gpu-memory", type=float, metavar="GiB", help="with --plan: the largest --micro-batch and "
                    "--max-new-tokens that fit this much memory")
    args = ap.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name) is not None}
    args.given = given
    base = read_config(args.config) if args.config else {}
    preset = given.get("preset", base.get("preset"))
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"error: --preset {preset!r} unknown; allowed: {sorted(PRESETS)}")
    for name in ("model", "data"):
        if preset is not None and name in given:
            raise SystemExit(f"error: --{name} with --preset {preset}: the {preset} preset builds its own model and "
                             f"synthetic problems; drop --preset {preset} to use --{name} {given[name]}")
    cfg = TrainConfig(**{**(PRESETS.get(preset) or {}), **base, **given})
    if args.gpu_memory is not None and not (args.plan and args.gpu_memory > 0):
        raise SystemExit(f"error: --gpu-memory {args.gpu_memory}: a positive size in GiB, with --plan")
    check(cfg, planning=args.plan)
    return cfg, args


def read_config(path: str) -> dict:
    """The TrainConfig fields of a saved config.json (a run's, to repeat or resume it)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such config file")
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise SystemExit(f"error: {path}: not a run's config (expected a JSON object)")
    kinds = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    if unknown := sorted(set(saved) - set(kinds) - set(RECORDED)):  # a typo would be ignored without a word
        raise SystemExit(f"error: {path}: unknown setting(s) {', '.join(unknown)}; the settings are train.py's "
                         f"flags with _ for - (python train.py --help)")
    return {k: typed(k, v, kinds[k], path) for k, v in saved.items() if k in kinds and k not in ("out", "stop_after")}


def typed(name: str, value, kind: str, path: str):
    """A setting read from a JSON file, checked against its field's type ("int | None", "float", ...)."""
    base, optional = kind.split(" | ")[0], kind.endswith("| None")
    if value is None and optional:
        return value
    allowed = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}[base]
    if not isinstance(value, allowed) or (isinstance(value, bool) and base != "bool"):
        raise SystemExit(f"error: {path}: {name} is {json.dumps(value)}; expected {kind.replace('|', 'or')}")
    return float(value) if base == "float" else value


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(cfg: TrainConfig, planning: bool = False):
    """One-line errors for settings that cannot work, before anything is built or written (`planning`:
    nothing will run, so --device cuda needs no GPU here)."""
    at_least = {"steps": 1, "prompts_per_step": 1, "micro_batch": 1, "checkpoint_every": 1, "rank": 1,
                "max_new_tokens": 1, "eval_every": 0, "eval_every_n": 1, "eval_max_new_tokens": 1, "eval_batch": 1,
                "warmup_steps": 0, "dynamic_every": 1, "dynamic_window": 1, "dynamic_t_init": 0,
                "eval_n": 1, "budget": 1, "stop_after": 1, "threads": 1, "r_min": 0, "r_max": 1}
    for name, low in at_least.items():
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise SystemExit(f"error: {flag(name)} {value}: must be >= {low}")
    if cfg.algo == "grpo" and cfg.num_generations < 2:
        raise SystemExit(f"error: --num-generations {cfg.num_generations}: GRPO compares completions of the same "
                         f"prompt, so it needs at least 2 (the study: 4)")
    if not 0 < cfg.fraction <= 1:
        raise SystemExit(f"error: --fraction {cfg.fraction}: must be in (0, 1]")
    if not cfg.lr > 0:
        raise SystemExit(f"error: --lr {cfg.lr}: must be > 0")
    if cfg.algo not in ALGOS:
        raise SystemExit(f"error: --algo {cfg.algo!r} unknown; allowed: {', '.join(ALGOS)}")
    if cfg.algo == "sft" and cfg.strategy == "base":
        raise SystemExit("error: --algo sft needs adapters to train; --strategy base only evaluates")
    if cfg.strategy not in STRATEGIES:
        raise SystemExit(f"error: --strategy {cfg.strategy!r} unknown; allowed: {', '.join(STRATEGIES)}")
    if cfg.scale_policy not in lora.SCALE_POLICIES:
        raise SystemExit(f"error: --scale-policy {cfg.scale_policy!r} unknown; allowed: {lora.SCALE_POLICIES}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise SystemExit(f"error: --lr-schedule {cfg.lr_schedule!r} unknown; allowed: constant, cosine")
    # cuda:N too: a run records the device it ran on (torchrun's processes take theirs from LOCAL_RANK)
    if cfg.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise SystemExit(f"error: --device {cfg.device!r} unknown; allowed: cpu, cuda (or cuda:N)")
    if (cfg.device or "").startswith("cuda") and not torch.cuda.is_available() and not planning:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise SystemExit(f"error: --device {cfg.device}: PyTorch {torch.__version__} ({build}) sees no CUDA device; "
                         f"--device cpu runs on the CPU")
    if cfg.dtype not in (None, *DTYPES):
        raise SystemExit(f"error: --dtype {cfg.dtype!r} unknown; allowed: {', '.join(DTYPES)}")
    if cfg.seeds is not None:
        try:
            rundir.parse_seeds(cfg.seeds)
        except ValueError as e:
            raise SystemExit(f"error: --seeds {e}")
    if cfg.compile not in ("auto", "on", "off"):
        raise SystemExit(f"error: --compile {cfg.compile!r} unknown; allowed: auto, on, off")
    try:  # GRPO's own settings are checked where they are defined; its messages open with the field's name
        sub_config(grpo.GRPOConfig, cfg)
    except ValueError as e:
        name, rest = str(e).split(" ", 1)
        raise SystemExit(f"error: {flag(name)} {rest}")


def sub_config(cls, cfg: TrainConfig, prefix: str = "", **extra):
    """Another module's config dataclass (grpo.GRPOConfig, dynamic.DynamicConfig) built from `cfg` by
    field name, `prefix` + name: each setting is spelled, defaulted and checked in one place."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in extra and hasattr(cfg, prefix + f.name)]
    return cls(**{n: getattr(cfg, prefix + n) for n in names}, **extra)


def read_json(path: str):
    """rundir.read_json, with a corrupt file as a one-line error."""
    try:
        return rundir.read_json(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def read_rank_pattern(path: str) -> dict:
    try:
        pattern = rundir.read_json(path)
    except OSError as e:
        raise SystemExit(f"error: --rank-pattern {path}: {e.strerror}")
    except ValueError as e:  # names the file and the line
        raise SystemExit(f"error: --rank-pattern {e}")
    if not isinstance(pattern, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                for k, v in pattern.items()):
        raise SystemExit(f"error: --rank-pattern {path}: expected a JSON object {{module path: integer rank}}")
    return pattern


def resume_config(run_dir: str, given: dict, is_main: bool = True, at_step: int | None = None) -> TrainConfig | None:
    """The saved config with the flags that may change on resume applied (and saved, by the main process);
    None when the run is finished. `at_step`: the step of the run's checkpoint, which --steps cannot undercut."""
    path = os.path.join(run_dir, rundir.CONFIG)
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume {run_dir}: no {rundir.CONFIG} (not a run folder)")
    saved = TrainConfig(**read_config(path))
    fixed = sorted(set(given) - set(RESUMABLE))
    if fixed:
        shown = ", ".join(f"{flag(k)} (the run has {getattr(saved, k)!r})" for k in fixed)
        raise SystemExit(f"error: {shown} cannot change when resuming; with --resume only "
                         f"{', '.join(flag(k) for k in RESUMABLE)} may be given")
    cfg = dataclasses.replace(saved, **{k: v for k, v in given.items() if k != "stop_after"})
    check(cfg)
    results = os.path.join(run_dir, rundir.RESULTS)
    if os.path.isfile(results):
        done = read_json(results).get("steps", cfg.steps)
        if cfg.steps <= done:
            print(f"{run_dir} is finished ({done} of {cfg.steps} steps; results.json): nothing to resume. "
                  f"--steps N > {done} trains it further")
            return None
    if at_step is not None and cfg.steps < at_step:  # it would end past its length, with config.json saying otherwise
        raise SystemExit(f"error: --steps {cfg.steps}: {run_dir} is already at step {at_step} ({rundir.CHECKPOINT}); "
                         f"a run cannot be shortened: give --steps {at_step} or more, or start a new run")
    if cfg != saved and is_main:  # e.g. more steps: the saved config says what the run became
        rundir.atomic_json(path, {**read_json(path), **{k: getattr(cfg, k) for k in given if k != "stop_after"}})
    return cfg


# ----------------------------------------------------------------- what the settings resolve to

def load_data(cfg: TrainConfig):
    """(train, test) problems; a missing, empty, malformed or altered file is a one-line error."""
    if cfg.preset == "tiny":
        return tiny.datasets()
    if cfg.preset == "organism":
        return organism.problems(organism.Recipe())
    try:
        return tuple(gsm8k.load_gsm8k(split, cfg.data, verify=not cfg.data_unverified) for split in ("train", "test"))
    except gsm8k.ChecksumError as e:
        raise SystemExit(f"error: {e}; --data-unverified accepts your own data")
    except (OSError, ValueError) as e:
        hint = " (no network? --data DIR reads local GSM8K jsonl files; --preset tiny needs none)" \
            if cfg.data is None else ""
        raise SystemExit(f"error: {one_line(e)}{hint}")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """A step's learning rate over the peak (--lr-schedule): linear warm-up, then constant or a cosine
    decay to 10%."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def set_threads(cfg: TrainConfig) -> str:
    """Fix the CPU thread count (saved in the config, since it sets the float summation order) and say why."""
    if cfg.threads is not None:
        why = "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        cfg.threads, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    elif cfg.preset is not None:  # a small model's operations take microseconds: threads only add waiting
        cfg.threads, why = 1, f"{cfg.preset} preset"
    else:
        cfg.threads, why = torch.get_num_threads(), "PyTorch's default"
    torch.set_num_threads(cfg.threads)
    return f"{cfg.threads} CPU thread{'s' if cfg.threads > 1 else ''} ({why})"


def choose_profile(cfg: TrainConfig) -> str:
    """The profile source of proportional/reduced: --profile (checked), else the newest fitting run; said aloud."""
    if cfg.profile is None:
        cfg.profile = rundir.newest_profile_run("runs", cfg.algo, cfg.model, cfg.preset)
        if cfg.profile is None:
            preset = f" --preset {cfg.preset}" if cfg.preset else ""
            raise SystemExit(f"error: --strategy {cfg.strategy} needs the gradient profile of a finished uniform run; "
                             f"none found under runs/. Run `python train.py{preset} --strategy uniform` first, "
                             f"or pass --profile RUN_DIR")
        return f"profile from {cfg.profile} (the newest finished uniform {cfg.algo} run of this model and preset)"
    problem = rundir.profile_problem(cfg.profile, cfg.algo, cfg.model, cfg.preset)
    if problem and not cfg.any_profile:
        raise SystemExit(f"error: --profile {cfg.profile}: {problem}; {cfg.strategy} needs the profile of a finished "
                         f"uniform {cfg.algo} run of the same model and preset (--any-profile to use it anyway)")
    return f"profile from {cfg.profile}" + (f" (accepted by --any-profile: {problem})" if problem else "")


def resolve_ranks(cfg: TrainConfig, num_layers: int) -> tuple[dict | None, dict]:
    """The rank pattern for apply_lora and a record of where it came from."""
    if cfg.rank_pattern:
        return read_rank_pattern(cfg.rank_pattern), {"source": cfg.rank_pattern}
    budget = cfg.budget or num_layers * cfg.rank
    info = {"budget": budget}
    shares = None
    if cfg.strategy in ("proportional", "reduced"):
        src = cfg.profile
        try:
            shares = allocate.read_shares(src, cfg.normalised_profile)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: --profile: {e}")
        info["profile"] = src
    strategy = "uniform" if cfg.strategy == "dynamic" else cfg.strategy  # dynamic starts uniform
    try:
        ranks = allocate.allocate(strategy, num_layers, budget, shares, cfg.r_min, cfg.r_max, cfg.seed,
                                  cfg.fraction)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    info["layer_ranks"] = ranks
    return allocate.rank_pattern(ranks), info


def model_config(cfg: TrainConfig) -> qwen.ModelConfig:
    """The model's shape without its weights: a preset's, a local folder's config.json, or the Hub's
    config.json alone (--plan needs nothing more). The presets' vocabularies are their tokenizers' bound."""
    if cfg.preset == "tiny":
        return qwen.ModelConfig(vocab_size=tiny.TINY_VOCAB, **tiny.TINY_SHAPE)
    if cfg.preset == "organism":
        r = organism.Recipe()
        return qwen.ModelConfig(vocab_size=r.vocab_size, hidden_size=r.hidden, intermediate_size=r.intermediate,
                                num_hidden_layers=r.layers, num_attention_heads=r.heads, num_key_value_heads=r.kv_heads,
                                tie_word_embeddings=r.tie_embeddings)
    try:
        if os.path.isdir(cfg.model):
            return qwen.read_config(cfg.model)
        from huggingface_hub import hf_hub_download
        return qwen.read_config(os.path.dirname(hf_hub_download(cfg.model, "config.json")))
    except Exception as e:  # a missing file, a refused architecture, no network
        raise SystemExit(f"error: cannot read {cfg.model!r}'s config.json: {one_line(e)}")


def known_layers(cfg: TrainConfig) -> int | None:
    """The model's layer count when it is known without building or downloading anything."""
    if cfg.preset == "tiny":
        return tiny.TINY_SHAPE["num_hidden_layers"]
    if cfg.preset == "organism":
        return organism.Recipe().layers
    try:
        return qwen.read_config(cfg.model).num_hidden_layers if os.path.isdir(cfg.model) else None
    except (OSError, ValueError):
        return None  # Run reports it, with the model's other errors
