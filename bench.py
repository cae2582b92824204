"""Benchmarks: our sampler, learn step and profiler side by side with transformers / PEFT (and TRL).

Everything runs in one process on the same random weights: a transformers Qwen2ForCausalLM is built at
the chosen shape, saved, and loaded by our model.py, so both compute the same function. Timings are
interleaved (ours, theirs, ours, ...) and reported as medians and as ratios, since only ratios taken
in one run mean anything on a shared machine. transformers, PEFT and TRL are imported here and in the
tests only, never by the product.

    python bench.py [--shape tiny|0.5b|1.5b] [--device cpu|cuda] [--dtype fp32|bf16] [--json FILE]

Reported: sampling_speedup (our tokens/s over transformers' generate, with the compiled decode step:
the default on CUDA, `--compile on` on the CPU; sampling_speedup_eager without it), learn_speedup
(PEFT's seconds over ours), learn_peak_mem_ratio (our peak memory over PEFT's), profiler_overhead
(the profiler's record() as a fraction of the learn step), grpo_step_speedup_vs_trl (tiny shape,
when trl is installed), and on CUDA the decode's achieved memory bandwidth and the learn step's MFU.
BENCH.md holds the measured figures and where the speed comes from.

`python bench.py --organism` times the whole organism run against TRL's GRPOTrainer + PEFT, and
`--organism-step` one step of it phase by phase (bench_organism.py).

Left out: multi-GPU scaling, and absolute seconds as a target (they move with the machine's load).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import generate as G
import logprobs as LP
import lora
import model as M
import rundir
from profiler import GradientProfiler

SHAPES = {
    "tiny": dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12)}  # bytes/s, bf16 FLOP/s


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict, repeats: int, device) -> dict:
    """Median seconds of each fn, run in turn `repeats` times after one warm-up each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(timed(f, device))
    return {k: statistics.median(v) for k, v in times.items()}


def build(shape: str, device, dtype, folder: str):
    """(transformers model, our model) with identical random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6)
    hf = Qwen2ForCausalLM(cfg)
    hf.save_pretrained(folder)
    hf = hf.to(device=device, dtype=dtype).eval()
    ours = M.from_pretrained(folder, device=device, dtype=dtype)
    return hf, ours


# ------------------------------------------------------------------------------------------ sampling

def bench_sampling(hf, ours, args, device) -> dict:
    """4 prompts x 4 samples, fixed prompt and completion lengths (no stop token), tokens/s.

    Ours runs eagerly and with the compiled decode step (generate(compile=True): a CUDA graph on a GPU,
    inductor's C++ on the CPU); `speedup` is the compiled one: train.py's default with CUDA, and
    `--compile on` on the CPU, where a compile takes 6-25 s per shape and pays off in long runs only.
    Each is also timed for a single new token, so that the difference gives the time of one decode
    step alone, without the prefill.
    """
    V = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    ids = torch.tensor(prompts, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def ours_fn(n, compile):
        return lambda: G.generate(ours, prompts, max_new_tokens=n, stop_ids=[], pad_id=0, num_samples=args.samples,
                                  temperature=1.0, generator=gen, compile=compile)

    def hf_fn(n):
        def f():
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, num_return_sequences=args.samples,
                            max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0, use_cache=True,
                            top_k=0, top_p=1.0, temperature=1.0)
        return f

    n = args.new_tokens
    fns = {"eager": ours_fn(n, False), "compiled": ours_fn(n, True), "transformers": hf_fn(n),
           "eager_1": ours_fn(1, False), "compiled_1": ours_fn(1, True), "transformers_1": hf_fn(1)}
    t = interleaved(fns, args.repeats, device)
    tokens = args.prompts * args.samples * n
    out = {f"{k}_tok_s": tokens / t[k] for k in ("eager", "compiled", "transformers")}
    out.update({f"{k}_s": t[k] for k in fns})
    out.update({f"{k}_decode_step_s": (t[k] - t[k + "_1"]) / (n - 1) for k in ("eager", "compiled", "transformers")})
    out["speedup_eager"] = t["transformers"] / t["eager"]
    out["speedup_compiled"] = t["transformers"] / t["compiled"]
    out["speedup"], out["ours_tok_s"] = out["speedup_compiled"], out["compiled_tok_s"]
    if device.type == "cuda":  # a decode step reads every weight once: bandwidth = weight bytes / step time
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        step = out["compiled_decode_step_s"]
        out["decode_bandwidth_GBs"] = weight_bytes / step / 1e9
        peak = next((v for k, v in PEAK.items() if k in torch.cuda.get_device_name()), None)
        if peak:
            out["bandwidth_fraction_of_peak"] = weight_bytes / step / peak[0]
    return out


# ---------------------------------------------------------------------------------------- learn step

def learn_inputs(V, args, device):
    g = torch.Generator().manual_seed(1)
    N, T = args.learn_seqs, args.prompt_len + args.new_tokens
    ids = torch.randint(0, V, (N, T), generator=g).to(device)
    adv = torch.randn(N, generator=g).to(device)
    return ids, adv


def ours_learn(model, ids, adv, args, profiler=None):
    """Forward + backward of a GRPO-style loss over the completion tokens, micro-batched."""
    n = args.new_tokens
    for i in range(0, ids.shape[0], args.micro_batch):
        s = slice(i, i + args.micro_batch)
        logp, _ = LP.completion_logprobs(model, ids[s], None, n)
        (-(logp * adv[s, None]).sum() / (ids.shape[0] * n)).backward()
    if profiler is not None:
        profiler.record()
    model.zero_grad(set_to_none=True)


def peft_learn(model, ids, adv, args):
    n = args.new_tokens
    for i in range(0, ids.shape[0], args.micro_batch):
        s = slice(i, i + args.micro_batch)
        logits = model(input_ids=ids[s], logits_to_keep=n + 1).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[s, -n:, None])[..., 0]
        (-(logp * adv[s, None]).sum() / (ids.shape[0] * n)).backward()
    model.zero_grad(set_to_none=True)


def peak_memory(fn, device) -> float:
    """Peak bytes above the starting point while fn runs (CUDA allocator, or the process RSS high-water mark)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return float("nan")  # on the CPU see measure_cpu_peak (a child process per measurement)


def bench_learn(hf, ours, args, device) -> dict:
    from peft import LoraConfig, get_peft_model
    lora.apply_lora(ours, r=args.rank, alpha=2 * args.rank)
    peft = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(lora.TARGETS)))
    peft.train()
    ours.train()
    ids, adv = learn_inputs(ours.config.vocab_size, args, device)
    prof = GradientProfiler(ours)

    def ours_ckpt():
        ours.gradient_checkpointing = True
        ours_learn(ours, ids, adv, args)
        ours.gradient_checkpointing = False

    t = interleaved({"ours": lambda: ours_learn(ours, ids, adv, args), "peft": lambda: peft_learn(peft, ids, adv, args),
                     "ours_ckpt": ours_ckpt}, args.repeats, device)
    out = {"ours_s": t["ours"], "peft_s": t["peft"], "ours_ckpt_s": t["ours_ckpt"], "speedup": t["peft"] / t["ours"]}
    # the profiler: its record() alone, timed over many calls on real gradients
    ours_learn(ours, ids, adv, args)
    lp = LP.completion_logprobs(ours, ids[:1], None, args.new_tokens)[0]
    lp.sum().backward()
    rec = interleaved({"record": prof.record}, max(20, args.repeats), device)["record"]
    out["profiler_record_s"] = rec
    out["profiler_overhead"] = rec / t["ours"]
    if device.type == "cuda":
        out["ours_peak_bytes"] = peak_memory(lambda: ours_learn(ours, ids, adv, args), device)
        out["peft_peak_bytes"] = peak_memory(lambda: peft_learn(peft, ids, adv, args), device)
        out["ours_ckpt_peak_bytes"] = peak_memory(ours_ckpt, device)
        tokens = ids.numel()
        n_params = sum(p.numel() for p in ours.parameters() if not p.requires_grad)
        # forward 2NT + backward through frozen weights 2NT (input gradients only; LoRA's are negligible)
        flops = 4 * n_params * tokens
        peak = next((v for k, v in PEAK.items() if k in torch.cuda.get_device_name()), None)
        if peak:
            out["mfu"] = flops / t["ours"] / peak[1]
    return out


def measure_cpu_peak(args, which: str, folder: str) -> float:
    """Peak memory growth of one learn step, measured in a fresh child process.

    The CPU allocator keeps no statistics, so the child loads only the model it measures, runs the
    step once (warm-up), resets the kernel's high-water mark (/proc/self/clear_refs) and reads VmHWM
    after a second step. MALLOC_MMAP_THRESHOLD_ makes glibc return every large tensor to the kernel
    when freed, so resident memory tracks live tensors.
    """
    import subprocess
    flags = ["--child", "cpu-peak", "--which", which, "--model-dir", folder, "--dtype", args.dtype,
             "--learn-seqs", str(args.learn_seqs), "--prompt-len", str(args.prompt_len),
             "--new-tokens", str(args.new_tokens), "--micro-batch", str(args.micro_batch), "--rank", str(args.rank)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *flags], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def cpu_peak_child(args):
    """`--child cpu-peak`: the peak resident memory of one learn step of `--which`, printed in bytes."""
    import gc
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM
    if args.which == "peft":
        hf = Qwen2ForCausalLM.from_pretrained(args.model_dir, dtype=DTYPES[args.dtype])
        m = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(lora.TARGETS)))
        fn = lambda: peft_learn(m, ids, adv, args)
    else:
        m = M.from_pretrained(args.model_dir, device="cpu", dtype=DTYPES[args.dtype])
        lora.apply_lora(m, r=args.rank, alpha=2 * args.rank)
        m.gradient_checkpointing = args.which == "ours_ckpt"
        fn = lambda: ours_learn(m, ids, adv, args)
    m.train()
    ids, adv = learn_inputs(m.config.vocab_size, args, torch.device("cpu"))
    fn()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size to the current one
    base = _proc_kb("VmRSS")
    fn()
    print((_proc_kb("VmHWM") - base) * 1024)


# --------------------------------------------------------------------------------- a whole GRPO step

def bench_grpo_vs_trl(args) -> dict:
    """Our whole GRPO step (eager and compiled decode) vs TRL's GRPOTrainer (PEFT LoRA r=8), tiny shape,
    4 x 4 completions of 32 tokens; `speedup` is with the compiled decode, as for sampling."""
    import importlib.util
    if importlib.util.find_spec("trl") is None:
        return {"skipped": "trl not installed (pip install trl)"}
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    res = {}
    for which in ("trl", "ours", "ours_compiled") * 3:  # interleaved processes
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "grpo-step", "--which", which,
                              "--grpo-steps", str(args.grpo_steps)], capture_output=True, text=True, cwd=here)
        if out.returncode != 0:
            return {"skipped": f"{which} failed: {out.stderr[-1500:]}"}
        res.setdefault(which, []).append(float(out.stdout.strip().splitlines()[-1]))
    trl_s, ours_s, compiled_s = (statistics.median(res[k]) for k in ("trl", "ours", "ours_compiled"))
    return {"trl_step_s": trl_s, "ours_step_s": ours_s, "ours_compiled_step_s": compiled_s,
            "speedup": trl_s / compiled_s, "speedup_eager": trl_s / ours_s, "runs": res}


class _CharTokenizer:
    """Digits-as-tokens stand-in: both sides decode ids the same way."""
    stop_ids, pad_id = [1], 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def grpo_child(args):
    """`--child grpo-step`: median seconds per GRPO step of `--which` over `--grpo-steps` steps (after one
    warm-up), printed on the last line."""
    import grpo
    which, steps = args.which, args.grpo_steps
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    # a reward that almost never ties within a group: with beta 0 ours skips a tied group (grpo.with_signal),
    # which would leave our side's learn step out of the measurement
    reward = lambda text, _ex: float(sum(map(int, text.split())) % 97)
    with tempfile.TemporaryDirectory() as d:
        hf, ours = build("tiny", torch.device("cpu"), torch.float32, d)
        prompts = [[int(x) for x in torch.randint(2, 600, (16,))] for _ in range(4)]
        if which.startswith("ours"):
            lora.apply_lora(ours, r=8, alpha=16, targets=("q_proj", "v_proj"))
            params = lora.lora_parameters(ours)
            opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.99))
            cfg = grpo.GRPOConfig(num_generations=4, max_new_tokens=32, beta=0.0, micro_batch=16,
                                  compile_decode=which == "ours_compiled")
            prof = GradientProfiler(ours)
            gen = torch.Generator().manual_seed(0)
            times = []
            for i in range(steps + 1):  # train.py's GRPO step, one pass
                t = time.perf_counter()
                batch = grpo.rollout(ours, _CharTokenizer(), prompts, [None] * 4, {"r": reward}, {"r": 1.0}, cfg, gen)
                grpo.reference_logprobs(ours, batch, cfg)
                opt.zero_grad(set_to_none=True)
                if grpo.backward(ours, batch, cfg)["learned"] != 1.0:
                    raise RuntimeError("a group tied: this step's learn step would not be measured whole")
                prof.record()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                times.append(time.perf_counter() - t)
            print(statistics.median(times[1:]))
            return
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
        tok = _hf_tokenizer(d)
        ds = Dataset.from_list([{"prompt": " ".join(map(str, p))} for p in prompts] * (steps + 2))
        times = []

        class Clock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t = time.perf_counter()

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - self.t)

        cfg = GRPOConfig(output_dir=os.path.join(d, "trl"), per_device_train_batch_size=16, num_generations=4,
                         max_completion_length=32, max_steps=steps + 1, logging_steps=1000, report_to=[],
                         use_cpu=True, beta=0.0, save_strategy="no", learning_rate=1e-5, disable_tqdm=True,
                         temperature=1.0)
        trainer = GRPOTrainer(model=hf, reward_funcs=lambda completions, **k: [reward(c, None) for c in completions],
                              args=cfg, train_dataset=ds, processing_class=tok,
                              peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                              callbacks=[Clock()])
        trainer.train()
        print(statistics.median(times[1:]))


def _hf_tokenizer(folder):
    """A word-level tokenizer over the ids '0'..'599' for TRL (which needs a transformers tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {str(i): i for i in range(600)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="0", eos_token="1", unk_token="0")


# ---------------------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description="Our sampler / learn step / profiler vs transformers, PEFT and TRL.")
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--learn-seqs", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--grpo-steps", type=int, default=8)
    ap.add_argument("--skip", nargs="*", default=[], choices=["sampling", "learn", "memory", "trl"])
    ap.add_argument("--json", help="write the results here")
    # bench.py runs some measurements in a fresh process of its own (peak memory, whole GRPO steps)
    ap.add_argument("--organism", action="store_true", help="the whole organism run, train.py against TRL's "
                    "GRPOTrainer + PEFT (--seeds runs each), time and accuracy; nothing else is measured")
    ap.add_argument("--organism-step", action="store_true", help="where one organism GRPO step's time goes, "
                    "phase by phase, the learn step beside the whole-sequence one it replaced")
    ap.add_argument("--seeds", type=int, default=3, help="--organism: runs per side")
    ap.add_argument("--jobs", type=int, default=2, help="--organism: runs at once (each is one thread)")
    ap.add_argument("--baseline", metavar="DIR", help="--organism: also time the train.py of this checkout "
                    "(an earlier commit), for a before/after ratio")
    ap.add_argument("--preset", choices=["organism", "tiny"], default="organism", help="--organism: the run to "
                    "compare (tiny: the pipeline in seconds, a smoke test)")
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["cpu-peak", "grpo-step", "organism-trl"], help=argparse.SUPPRESS)
    ap.add_argument("--which", choices=["ours", "ours_ckpt", "peft", "trl", "ours_compiled"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.organism or args.organism_step or args.child == "organism-trl":  # whole runs: bench_organism.py
        import bench_organism
        return (bench_organism.main(args) if args.organism else bench_organism.trl_child(args) if args.child
                else bench_organism.step_profile(args))
    if args.child:
        return cpu_peak_child(args) if args.child == "cpu-peak" else grpo_child(args)
    result = {"shape": args.shape, "device": str(device), "dtype": args.dtype,
              "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                      "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}}
    tmp = tempfile.TemporaryDirectory()  # the saved weights: child processes load them again
    hf, ours = build(args.shape, device, DTYPES[args.dtype], tmp.name)
    if "sampling" not in args.skip:
        s = bench_sampling(hf, ours, args, device)
        result["sampling"], result["sampling_speedup"] = s, s["speedup"]
        result["sampling_speedup_eager"] = s["speedup_eager"]
        print(f"sampling  ours {s['eager_tok_s']:9.1f} tok/s eager, {s['compiled_tok_s']:9.1f} compiled   "
              f"transformers {s['transformers_tok_s']:9.1f} tok/s   x{s['speedup_eager']:.2f} eager, "
              f"x{s['speedup_compiled']:.2f} compiled", flush=True)
        print(f"decode    one step: ours {1e3 * s['eager_decode_step_s']:.3f} ms eager, "
              f"{1e3 * s['compiled_decode_step_s']:.3f} ms compiled   transformers "
              f"{1e3 * s['transformers_decode_step_s']:.3f} ms", flush=True)
        if "decode_bandwidth_GBs" in s:
            print(f"bandwidth {s['decode_bandwidth_GBs']:.0f} GB/s = "
                  f"{100 * s.get('bandwidth_fraction_of_peak', float('nan')):.0f}% of peak", flush=True)
    if "learn" not in args.skip:
        lr = bench_learn(hf, ours, args, device)
        result["learn"], result["learn_speedup"] = lr, lr["speedup"]
        result["profiler_overhead"] = lr["profiler_overhead"]
        print(f"learn     ours {lr['ours_s']:9.4f} s       peft {lr['peft_s']:9.4f} s   x{lr['speedup']:.2f}"
              f"   (ours with checkpointing {lr['ours_ckpt_s']:.4f} s)", flush=True)
        print(f"profiler  record() {1e3 * lr['profiler_record_s']:.3f} ms = {100 * lr['profiler_overhead']:.3f}% "
              f"of the learn step", flush=True)
        if device.type == "cuda":
            mem = {k: lr[f"{k}_peak_bytes"] for k in ("ours", "peft", "ours_ckpt")}
        elif "memory" not in args.skip:
            mem = {k: measure_cpu_peak(args, k, tmp.name) for k in ("ours", "peft", "ours_ckpt")}
        else:
            mem = None
        if mem:
            result["learn_peak_bytes"] = mem
            result["learn_peak_mem_ratio"] = mem["ours"] / mem["peft"]
            result["learn_ckpt_peak_mem_ratio"] = mem["ours_ckpt"] / mem["peft"]
            print(f"memory    ours {mem['ours'] / 2**20:9.1f} MiB   peft {mem['peft'] / 2**20:9.1f} MiB   "
                  f"ratio {result['learn_peak_mem_ratio']:.2f}   (checkpointing: "
                  f"{mem['ours_ckpt'] / 2**20:.1f} MiB, ratio {result['learn_ckpt_peak_mem_ratio']:.2f})", flush=True)
    if "trl" not in args.skip and args.shape == "tiny" and device.type == "cpu":
        g = bench_grpo_vs_trl(args)
        result["grpo_step"] = g
        if "speedup" in g:
            result["grpo_step_speedup_vs_trl"] = g["speedup"]
            result["grpo_step_speedup_vs_trl_eager"] = g["speedup_eager"]
            print(f"grpo step ours {g['ours_step_s']:9.4f} s eager, {g['ours_compiled_step_s']:.4f} s compiled   "
                  f"trl {g['trl_step_s']:9.4f} s   x{g['speedup_eager']:.2f} eager, x{g['speedup']:.2f} compiled")
        else:
            print(f"grpo step vs TRL skipped: {g['skipped']}")
    if args.json:
        rundir.atomic_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
