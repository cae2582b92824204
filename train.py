"""The whole study from one command: LoRA + GRPO on GSM8K, profiled every step, evaluated at the end.

    python train.py --strategy uniform                    # the study's uniform arm (r=32 everywhere)
    python train.py --strategy proportional               # ranks from the latest uniform run's profile
    python train.py --strategy reduced | random | base
    python train.py --preset tiny --strategy uniform      # offline, CPU, seconds: the pipeline runs
    python train.py --preset organism                     # offline, CPU, ~2 minutes: GRPO really learns
    python train.py --resume runs/uniform-20261129-120000
    python train.py --config runs/uniform-20261129-120000/config.json --out runs/again   # the same run again
    python train.py --strategy dynamic                    # ranks moved during training (dynamic.py)
    python train.py --algo sft                            # the same LoRA trained by SFT, for the regime comparison
    python train.py --strategy uniform --seeds 0,1,2      # one run per seed
    python report.py runs/*                               # the study's results table + gradient statistics

This is the only file that wires the others together: model.py loads Qwen2, lora.py adapts it with
the ranks allocate.py computes, grpo.py (or sft.py) gives the loss on gsm8k.py's prompts and rewards,
profiler.py records every adapter's gradient, evaluate.py scores the result and checkpoint.py keeps
what --resume needs. The loop, train(), shows every phase of a step in order. A run folder holds
everything needed to audit or reproduce it: config.json (every setting, resolved), ranks.json,
metrics.jsonl, the gradient profile, periodic and final evaluation records, the adapter in PEFT
format, checkpoint.pt and results.json.

Left out: what each phase computes (the modules named above); gradient accumulation across steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import time

import numpy as np
import torch

import allocate
import checkpoint
import config
import dynamic
import evaluate
import grpo
import gsm8k
import lora
import model as qwen
import organism
import parallel
import plan
import rundir
import sft
import tiny
from config import TrainConfig
from profiler import GradientProfiler, steps_without_gradient
from rundir import atomic_json, hold


def log(msg: str):
    if parallel.is_main():
        print(msg, flush=True)


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of one step: a function of (seed, step) alone, so a resumed run, or one split
    over several processes, draws exactly the samples an uninterrupted single process draws."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------- the run

class Run:
    """Everything one training run owns: model, optimiser, profiler, data order, and its folder."""

    def __init__(self, cfg: TrainConfig, run_dir: str, device: torch.device):
        self.cfg, self.dir, self.device = cfg, run_dir, device
        self.lock = None  # the run folder's writer lock (rundir.hold), held while this process writes it
        if self.device.type == "cpu" and cfg.preset is None:
            log("note: no GPU, running on the CPU. Real results need the real model on a GPU; "
                "--preset tiny runs the whole pipeline in seconds.")
        seed_everything(cfg.seed)
        local = os.path.exists(cfg.model) or cfg.model.startswith((".", "/"))
        if cfg.preset != "tiny" and local:  # a local folder's errors first: they cost nothing to find
            try:
                qwen.read_config(qwen.resolve(cfg.model))
            except (OSError, ValueError) as e:
                raise SystemExit(f"error: cannot load model {cfg.model!r}: {config.one_line(e)}")
        self.train_set, self.test_set = config.load_data(cfg)  # before a download or a model build
        self.model_path = cfg.model
        if cfg.preset == "tiny":
            self.model_path = os.path.join(run_dir, rundir.TINY_MODEL)
            if parallel.is_main():
                os.makedirs(run_dir, exist_ok=True)
                tiny.build_tiny_model(self.model_path)
            parallel.barrier()
        elif cfg.preset == "organism":  # built once per machine (by rank 0), then found in its cache folder
            try:
                if parallel.is_main():
                    organism.build(log=log)
                parallel.barrier()
                self.model_path = organism.build()
            except ValueError as e:  # a damaged cache: which folder to delete
                raise SystemExit(f"error: {e}")
        try:
            self.model = qwen.from_pretrained(self.model_path, device=self.device,
                                              dtype=config.DTYPES[cfg.dtype] if cfg.dtype else None)
            self.tok = qwen.load_tokenizer(self.model_path)
        except (OSError, ValueError) as e:
            hint = "" if os.path.isdir(self.model_path) else (
                " (no network? --model DIR loads a local Qwen2 folder and --data DIR local GSM8K files; "
                "--preset tiny runs offline)")
            raise SystemExit(f"error: cannot load model {self.model_path!r}: {config.one_line(e)}{hint}")
        self.ranks, self.rank_info, self.opt, self.sched, self.profiler = {}, {}, None, None, None
        self.step = 0
        self.gen = torch.Generator(device=self.device)  # reseeded every step (step_seed)
        if cfg.strategy != "base":
            pattern, self.rank_info = config.resolve_ranks(cfg, self.model.config.num_hidden_layers)
            capacity = None
            if cfg.strategy == "dynamic":  # room to grow to r_max without changing shapes
                self.bounds = allocate.bounds("proportional", self.model.config.num_hidden_layers,
                                              self.rank_info["budget"], cfg.r_min, cfg.r_max)
                capacity = self.bounds[1]
            seed_everything(cfg.seed)  # LoRA's init draws from here: the same A whatever ran before
            try:
                self.ranks = lora.apply_lora(self.model, r=cfg.rank, alpha=cfg.alpha, rank_pattern=pattern,
                                             dropout=cfg.dropout, scale_policy=cfg.scale_policy, capacity=capacity)
            except ValueError as e:
                raise SystemExit(f"error: {e}")
            if not any(self.ranks.values()):
                raise SystemExit("error: every module has rank 0: nothing to train (--strategy base evaluates the "
                                 "model as is)")
            parallel.broadcast(lora.lora_parameters(self.model))  # every process starts from rank 0's adapters
            self.model.gradient_checkpointing = cfg.grad_checkpointing
            self.opt, self.sched = configure_optimizers(self.model, cfg)
            self.profiler = GradientProfiler(self.model, scale_policy=cfg.scale_policy)
        self.compile = cfg.compile == "on" or (cfg.compile == "auto" and self.device.type == "cuda")
        self.grpo_cfg = config.sub_config(grpo.GRPOConfig, cfg, compile_decode=self.compile)
        self.dynamic_cfg = config.sub_config(dynamic.DynamicConfig, cfg, prefix="dynamic_")
        self.rewards = {"correct": lambda text, ex: gsm8k.correct_reward(text, ex.gold),
                        "format": lambda text, ex: gsm8k.format_reward(text, cfg.format_strict)}
        self.weights = {"correct": cfg.reward_correct, "format": cfg.reward_format}

    def scale_of(self, r: int) -> float:
        """The scale policy's multiplier for an adapter of rank r (dynamic moves)."""
        return lora.lora_scale(self.cfg.scale_policy, self.cfg.alpha, r, self.cfg.rank)

    def batch(self, step: int) -> list:
        """This step's problems: B prompts for GRPO, B x K reference solutions for SFT (same sequences)."""
        B = self.cfg.prompts_per_step * (self.cfg.num_generations if self.cfg.algo == "sft" else 1)
        return gsm8k.step_problems(self.train_set, self.cfg.seed, step, B)

    def prompts(self, examples) -> list[list[int]]:
        return [self.tok.encode(gsm8k.prompt_text(ex.question, self.tok.chat)) for ex in examples]

    # -- checkpoints: checkpoint.py's one file, plus the profile (its own file)
    def save_checkpoint(self):
        if parallel.is_main():
            path = os.path.join(self.dir, rundir.CHECKPOINT)
            try:  # the profile first: rows past a checkpoint are recomputed, rows missing from it are lost
                self.profiler.save(self.dir)
                checkpoint.save(path, self.step, self.model, self.opt, self.sched, self.device)
            except (OSError, RuntimeError) as e:  # a full disk: torch.save raises RuntimeError, not OSError
                kept = "the previous checkpoint is intact" if os.path.isfile(path) else "no checkpoint was written"
                raise SystemExit(f"error: cannot write the checkpoint (or profile) in {self.dir} at step {self.step} "
                                 f"({config.one_line(e)}; a full disk?); {kept}: free space, then --resume {self.dir}")

    def load_checkpoint(self):
        try:
            self.step = checkpoint.load(os.path.join(self.dir, rundir.CHECKPOINT), self.model, self.opt, self.sched,
                                        self.device)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        # Every file must reach the checkpoint's step; what lies beyond it is recomputed. A file that
        # falls short lost steps, and resuming would hide that: refuse, saying what is missing.
        metrics = os.path.join(self.dir, rundir.METRICS)
        try:
            lines, torn = rundir.read_metrics(metrics)
        except ValueError as e:
            raise SystemExit(f"error: {e}; the run cannot be resumed: start it again with another --out")
        if torn:  # a crash while appending a step's line: that step is recomputed, or found lost below
            log(f"note: {metrics}: its last line was torn (a crash while it was written) and is dropped")
        try:
            self.profiler.load(self.dir)
        except Exception as e:
            raise SystemExit(f"error: {self.dir}/{rundir.PROFILE} cannot be read ({config.one_line(e)}); the run "
                             f"cannot be resumed: start it again with another --out")
        for name, have in ((rundir.METRICS, len(lines)), (rundir.PROFILE, len(self.profiler))):
            if have < self.step:
                raise SystemExit(f"error: {self.dir}/{name} holds {have} of the checkpoint's {self.step} steps: "
                                 f"steps were lost, so the run cannot be resumed honestly; start it again with "
                                 f"another --out")
        self.profiler.truncate(self.step)  # steps after the checkpoint are recomputed
        if parallel.is_main():
            rundir.atomic_lines(metrics, lines[:self.step])

    # -- evaluation
    def evaluate(self, examples, name: str) -> dict:
        """Greedy evaluation, sharded over data-parallel ranks (every k-th problem) and gathered."""
        cfg = self.cfg
        mine = examples[parallel.rank()::parallel.world()]
        with lora.merged(self.model) if self.ranks else contextlib.nullcontext():
            local = evaluate.evaluate(self.model, self.tok, mine, max_new_tokens=cfg.eval_max_new_tokens,
                                      batch_size=cfg.eval_batch, compile=self.compile)
        records = sorted((r for part in parallel.gather(local) for r in part), key=lambda r: r["index"])
        res = evaluate.summarise(records)
        if parallel.is_main():  # every answer, for audit; then the numbers
            rundir.atomic_lines(os.path.join(self.dir, rundir.eval_records(name)),
                                [json.dumps(r) + "\n" for r in records])
            atomic_json(os.path.join(self.dir, rundir.eval_summary(name)), res)
        return res

    def log_step(self, m: dict, t0: float, per_step: float) -> dict:
        """Every process's metrics merged into one line of metrics.jsonl, and the progress line."""
        m = parallel.merge_metrics(parallel.gather(m))
        m["step"], m["time_step"] = self.step, time.perf_counter() - t0
        if parallel.is_main():
            with open(os.path.join(self.dir, rundir.METRICS), "a") as f:
                f.write(json.dumps(m) + "\n")
        log(progress_line(self.step, self.cfg.steps, m, m["time_step"], per_step * (self.cfg.steps - self.step),
                          kl_measured=self.cfg.beta != 0))
        return m


def configure_optimizers(model, cfg: TrainConfig):
    """AdamW on the adapters alone (fp32 state), and its schedule (config.lr_factor)."""
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: config.lr_factor(cfg, step))


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(step: int, total: int, m: dict, sec: float, eta: float, kl_measured: bool = True) -> str:
    if "reward" not in m:  # SFT
        body = f"loss {m['loss']:.4f} | grad {m['grad_norm']:.3f} | tokens {m['tokens']}"
    else:  # with beta = 0 the KL term is not computed (grpo.per_token_loss): "off", not a measured 0
        kl = f"{m['kl']:.4f}" if kl_measured else "off (beta 0)"
        body = (f"reward {m['reward']:.3f} | acc {m['reward/correct']:.2f} | fmt {m['reward/format']:.2f} | "
                f"kl {kl} | len {m['completion_len']:.0f}" + (" | no signal: every group tied" if m["no_signal"] else ""))
    return f"step {step:>4}/{total} | {body} | {sec:.2f}s/step | ETA {fmt_time(eta)}"


def train(run: Run, stop_after: int | None) -> bool:
    """The study's loop. Each step: rollout, reference log-probs, then per pass backward, all-reduce,
    profile, clip, optimiser step; the schedule; a dynamic move; log, evaluate, checkpoint. Returns
    False when --stop-after stopped it (a checkpoint written); Ctrl-C writes one and exits."""
    cfg, model, opt, gcfg = run.cfg, run.model, run.opt, run.grpo_cfg
    params = lora.lora_parameters(model)
    start_step, t_start = run.step, time.perf_counter()
    with ctrl_c_ends_the_step(run) as interrupted, oom_as_one_line():
        while run.step < cfg.steps:
            if stop_here(run, interrupted, stop_after, done=run.step - start_step):
                return False
            t0 = time.perf_counter()
            examples = parallel.shard(run.batch(run.step))  # this process's share of the step's problems
            run.gen.manual_seed(step_seed(cfg.seed, run.step))
            if cfg.algo == "grpo":  # rollout: sample K completions per prompt, score them, group advantages
                batch = grpo.rollout(model, run.tok, run.prompts(examples), examples, run.rewards, run.weights,
                                     gcfg, run.gen)
                m, passes = grpo.rollout_metrics(batch, list(run.rewards), gcfg.num_generations), gcfg.num_iterations
                grpo.reference_logprobs(model, batch, gcfg)  # adapters off: the KL's anchor
            else:  # SFT: the reference solutions, one pass
                batch, m, passes = sft.sft_batch(run.tok, examples, run.device), {}, 1
            t_learn, m["lr"] = time.perf_counter(), opt.param_groups[0]["lr"]  # the rate this step uses
            for it in range(passes):
                opt.zero_grad(set_to_none=True)
                if cfg.algo == "grpo":  # backward: the loss alone, micro-batch by micro-batch
                    m |= grpo.backward(model, batch, gcfg, first=it == 0)
                else:
                    m |= sft.backward(model, *batch, micro_batch=cfg.micro_batch)
                parallel.all_reduce_grads(params)  # the whole batch's gradient, on every process
                if it == 0:
                    run.profiler.record()  # the study's measurement: every adapter's gradient, before clipping
                clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
                m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))
                opt.step()
            run.sched.step()  # once per step: the schedule counts steps, as --steps and --warmup-steps do
            opt.zero_grad(set_to_none=True)
            m["time_learn"] = time.perf_counter() - t_learn
            run.step += 1
            if cfg.strategy == "dynamic" and dynamic.should_move(run.step, run.dynamic_cfg):
                if why := dynamic.no_signal(run.profiler, run.dynamic_cfg, run.rank_info["budget"], run.bounds):
                    m["move_skipped"] = why  # nothing to move rank by: keep the ranks, say why
                    log(f"ranks kept at step {run.step}: {why}")
                else:
                    m["moved_ranks"] = dynamic.reallocate(model, run.profiler, opt, budget=run.rank_info["budget"],
                                                          bounds=run.bounds, scale_of=run.scale_of,
                                                          cfg=run.dynamic_cfg)
                    log(f"ranks moved at step {run.step}: {m['moved_ranks']}")
            run.log_step(m, t0, per_step=(time.perf_counter() - t_start) / (run.step - start_step))
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
                res = run.evaluate(gsm8k.subset(run.test_set, cfg.eval_every_n), f"step{run.step}")
                log(f"eval @ {run.step}: accuracy {res['accuracy']:.3f} format {res['format_rate']:.2f}")
            if run.step % cfg.checkpoint_every == 0:
                run.save_checkpoint()
    run.save_checkpoint()
    return True


@contextlib.contextmanager
def ctrl_c_ends_the_step(run: Run):
    """Ctrl-C asks to stop at the next step boundary (a step cut in half would be checkpointed half
    done); a second Ctrl-C stops at once. Yields the list the handler appends to."""
    interrupted = []

    def on_sigint(signum, frame):
        if interrupted:  # SystemExit, not KeyboardInterrupt: one line, no traceback
            raise SystemExit(f"\ninterrupted twice: stopped at once; --resume {run.dir} continues from the "
                             f"last checkpoint")
        interrupted.append(True)
        log("\ninterrupted: finishing this step, then writing a checkpoint (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def oom_as_one_line():
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise SystemExit("error: CUDA out of memory. Lower --micro-batch, add --grad-checkpointing, "
                         "or lower --max-new-tokens")


def stop_here(run: Run, interrupted: list, stop_after: int | None, done: int) -> bool:
    """At a step boundary: write a checkpoint and stop if Ctrl-C was pressed (on any process) or this
    invocation has done its --stop-after steps."""
    if parallel.sum_int(len(interrupted)) > 0:  # every process stops at the same step
        run.save_checkpoint()
        log(f"\ninterrupted: checkpoint at step {run.step} written; resume with --resume {run.dir}")
        raise SystemExit(130)
    if stop_after is None or done < stop_after:
        return False
    run.save_checkpoint()
    log(f"stopped after {stop_after} steps at step {run.step}; resume with --resume {run.dir}")
    return True


def finish(run: Run, t_total: float):
    """Final adapter, profile, evaluation and results.json."""
    cfg = run.cfg
    tokens, silent, no_gradient = 0, 0, 0
    if run.ranks and parallel.is_main():
        lora.save_adapter(run.model, os.path.join(run.dir, rundir.ADAPTER), r=cfg.rank, alpha=cfg.alpha,
                          scale_policy=cfg.scale_policy, base_model_name_or_path=run.model_path)
        run.profiler.save(run.dir)
        with open(os.path.join(run.dir, rundir.METRICS)) as f:
            steps = [json.loads(line) for line in f]
        tokens = sum(m["tokens"] for m in steps)
        silent = sum(bool(m.get("no_signal")) for m in steps)  # GRPO steps whose every group tied
        no_gradient = steps_without_gradient(run.profiler.profile())
        if no_gradient:  # a run without signal must not finish as if it had one
            log(f"warning: {no_gradient} of {run.step} steps carried no gradient ({silent} with every group's rewards "
                f"tied): " + ("the gradient profile is empty and its statistics read 'no signal'"
                              if no_gradient == run.step else "they count as zeros in the profile's means"))
    problems = gsm8k.subset(run.test_set, cfg.eval_n)
    log(f"final evaluation on {len(problems)} test problems ...")
    t_eval = time.perf_counter()
    res = run.evaluate(problems, "final")
    t_eval = time.perf_counter() - t_eval
    active = [m.r for m in lora.lora_modules(run.model).values()]  # final ranks (they move when dynamic)
    results = {"strategy": cfg.strategy if not cfg.rank_pattern else f"pattern:{os.path.basename(cfg.rank_pattern)}",
               "algo": cfg.algo, "seed": cfg.seed, "rank_min": min(active, default=0),
               "rank_max": max(active, default=0),
               "lora_params": lora.count_lora_params(run.model)["total"] if run.ranks else 0,
               "accuracy": res["accuracy"], "ci95": res["ci95"], "n": res["n"], "correct": res["correct"],
               "format_rate": res["format_rate"], "lenient_accuracy": res["lenient_accuracy"],
               "steps": run.step, "steps_without_signal": silent, "steps_without_gradient": no_gradient,
               "time_s": t_total, "time_eval_s": t_eval, "train_tokens": tokens,
               "code_version": rundir.code_version(), "torch_version": torch.__version__}
    if cfg.strategy == "dynamic":
        results["final_layer_ranks"] = dynamic.layer_ranks(run.model)
    if parallel.is_main():
        atomic_json(os.path.join(run.dir, rundir.RESULTS), results)
    log(f"accuracy {res['accuracy']:.3f} (95% CI {res['ci95'][0]:.3f}-{res['ci95'][1]:.3f}), "
        f"format {res['format_rate']:.2f}; results in {run.dir}")


def run_one(cfg: TrainConfig, run_dir: str, resume: bool, stop_after: int | None):
    """One run from its config: set up (or resume), train, evaluate. A setup that fails before the run's
    config.json is written leaves no folder behind."""
    threads = config.set_threads(cfg)
    device = parallel.init(cfg.device)  # under torchrun: join the group before anyone writes
    if cfg.prompts_per_step % parallel.world():  # before anything is written (parallel.shard would say it later)
        raise SystemExit(f"error: --prompts-per-step {cfg.prompts_per_step} must be a multiple of the "
                         f"{parallel.world()} processes torchrun started")
    notes = []
    if not resume:
        try:
            rundir.check_out(run_dir)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        if os.path.isfile(os.path.join(run_dir, rundir.CONFIG)):
            raise SystemExit(f"error: {run_dir} already holds a run; use --resume {run_dir} or another --out")
        if cfg.rank_pattern:  # cheap checks before loading a model
            config.read_rank_pattern(cfg.rank_pattern)
        elif cfg.strategy in ("proportional", "reduced"):
            notes.append(config.choose_profile(cfg))
        if cfg.strategy != "base" and (layers := config.known_layers(cfg)):
            config.resolve_ranks(cfg, layers)  # budget and bound errors now, not after a model build
    parallel.barrier()  # every process has checked the folder before rank 0 writes into it
    t0 = time.perf_counter()
    created = os.path.abspath(run_dir)  # the outermost folder this run will create, removed on failure
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = None if os.path.exists(created) else created
    lock = None
    try:
        if not resume and parallel.is_main():  # the writer lock before anything is written (tiny-model too)
            os.makedirs(run_dir, exist_ok=True)
            try:  # another train.py may have started on this --out meanwhile: the folder is then its
                lock = hold(run_dir)
            except ValueError as e:
                created = None
                raise SystemExit(f"error: {e}")
            if os.path.isfile(os.path.join(run_dir, rundir.CONFIG)):
                created = None
                raise SystemExit(f"error: {run_dir} already holds a run; use --resume {run_dir} or another --out")
        run = Run(cfg, run_dir, device)
        run.lock = lock
        if not resume and parallel.is_main():
            atomic_json(os.path.join(run_dir, rundir.RANKS), {"ranks": run.ranks, **run.rank_info})
            atomic_json(os.path.join(run_dir, rundir.CONFIG),  # last: its presence makes the folder a run
                        {**dataclasses.asdict(cfg), "model_path": run.model_path, "torch": torch.__version__,
                         "device": str(run.device)})
    except BaseException:
        if created and not resume and parallel.is_main():
            shutil.rmtree(created, ignore_errors=True)
        raise
    if run.ranks and not resume:
        for line in plan.for_run(cfg, run.device.type, model=run.model):
            log(line)
    log(f"run {run_dir}: {cfg.algo}, strategy {cfg.strategy}, seed {cfg.seed}, {run.model.config.num_hidden_layers} "
        f"layers, {lora.count_lora_params(run.model)['total'] if run.ranks else 0:,} LoRA parameters, {run.device} "
        f"({str(run.model.lm_head.weight.dtype).removeprefix('torch.')} weights), "
        f"{threads}")
    for note in notes:
        log(note)
    if run.ranks:
        if resume:
            resume_state(run)
        if not train(run, stop_after):
            return
    finish(run, time.perf_counter() - t0)


def resume_state(run: Run):
    """Continue from the checkpoint; without one, start again at step 0 and discard what was logged."""
    if os.path.isfile(os.path.join(run.dir, rundir.CHECKPOINT)):
        run.load_checkpoint()
        log(f"resumed at step {run.step}")
        return
    lines = rundir.count_lines(os.path.join(run.dir, rundir.METRICS))
    if parallel.is_main():
        rundir.truncate_jsonl(os.path.join(run.dir, rundir.METRICS), 0)
        for name in (rundir.PROFILE, rundir.PROFILE_SUMMARY):
            if os.path.isfile(os.path.join(run.dir, name)):
                os.remove(os.path.join(run.dir, name))
    log(f"no checkpoint in {run.dir}: starting again at step 0" +
        (f" (the {lines} steps logged before are discarded)" if lines else ""))


def main(argv=None):
    cfg, args = config.parse_args(argv)
    if args.plan:  # nothing is loaded or written: the model's config.json and the settings
        if args.resume:
            raise SystemExit(f"error: --plan with --resume: plan a run from its settings with "
                             f"--config {os.path.join(args.resume, rundir.CONFIG)} --plan")
        if cfg.strategy == "base":
            raise SystemExit("error: --plan with --strategy base: nothing trains, so there is no step to plan")
        if cfg.strategy in ("proportional", "reduced") and not cfg.rank_pattern:
            log(config.choose_profile(cfg))
        for line in plan.for_run(cfg, cfg.device or "cuda", args.gpu_memory):
            log(line)
        return
    if args.resume:
        # before anything reads or writes the folder; the group is not joined yet, so torchrun's RANK
        # says which process will write
        if os.environ.get("RANK", "0") == "0" and os.path.isfile(os.path.join(args.resume, rundir.CONFIG)):
            try:
                _lock = hold(args.resume)  # noqa: F841 (held until this process ends)
            except ValueError as e:
                raise SystemExit(f"error: {e}")
        resumed = config.resume_config(args.resume, args.given, parallel.is_main(),
                                       at_step=checkpoint.step_of(os.path.join(args.resume, rundir.CHECKPOINT)))
        if resumed is not None:
            run_one(resumed, args.resume, True, args.given.get("stop_after"))
        return
    out = cfg.out or os.path.join("runs", f"{cfg.algo + '-' if cfg.algo != 'grpo' else ''}{cfg.strategy}-"
                                          f"{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.seeds:
        run_one(cfg, out, False, cfg.stop_after)
        return
    for seed in rundir.parse_seeds(cfg.seeds):  # one after another (checked by config.check); report.py summarises
        run_one(dataclasses.replace(cfg, seed=seed, seeds=None), os.path.join(out, f"seed{seed}"), False,
                cfg.stop_after)


def cli(argv=None):
    """The command line: main, with Ctrl-C outside the step loop (set-up, final evaluation) as one line."""
    try:
        main(argv)
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted: nothing after the last checkpoint was saved; --resume RUN_DIR continues")
    finally:
        parallel.close()


if __name__ == "__main__":
    cli()
