"""What one training step will need in memory, predicted before anything is loaded: phase by phase,
from the model's config.json and the run's settings (`python train.py --plan`; every run prints it).

    phase                 alive
    weights               the frozen model, in --dtype
    adapters + AdamW      LoRA weights, their gradients and AdamW's two moments: 16 bytes a parameter
    KV cache              kept between steps when the decode step is compiled (a CUDA graph reads it
                          at fixed addresses, generate.py); freed after sampling otherwise
    sampling              the merge's copy of every adapted weight (lora.merged restores it bit for
                          bit), the KV cache (B prompts once, then K samples' tokens each: model.KVCache)
                          and the prefill's activations
    learn activations     what autograd keeps for backward over one micro-batch: its completions and the
                          prompts they continue, each prompt once (model.SharedPrompts), counted by
                          running our own forward on PyTorch's "meta" device (shapes,
                          no memory, no weights); attention as SDPA's CPU kernel keeps it (q, k, v, the
                          output and one fp32 number per query and head; on CUDA, see below)
    logits                the micro-batch's logits in --dtype and their gradient, and a few 16 MiB fp32
                          chunks of them (logprobs.TokenLogProbs)
    evaluation            greedy decoding of --eval-batch problems: the merge's copy, their KV cache
                          (kept, when compiled and --eval-every is set, like sampling's) and the prefill's
                          activations

The peak is the persistent part (weights, adapters + AdamW, kept KV caches) plus the largest of the
sampling, learn and evaluation phases. Assumed, since the settings do not say: every completion runs to
--max-new-tokens (the padded batch is as long as its longest completion; SFT's reference solutions are
taken as that long too) and prompts are PROMPT_TOKENS long; a compiled decoder's cache is rounded up to
a multiple of 256 tokens, as generate.py does (prompts of other lengths may add a bucket each). Not
counted: the allocator's fragmentation and CUDA's own context (a few hundred MiB, which is why the
fitting search leaves MARGIN free), the data and the gradient profile (kilobytes a step), and with
--grad-checkpointing the prompts' keys and values of every layer, which the checkpointed blocks keep
alive until backward (2 x layers x prompts x prompt tokens x KV width: about 29 MiB at the study's shape
with micro-batch 16, under 1% of the peak). SFT is planned as one completion per prompt, which
overestimates its whole-sequence pass slightly.

Attention is counted as SDPA's CPU kernel keeps it, which the tests check against a measurement. On
CUDA, a masked grouped-query attention may run another kernel (cuDNN, or the math kernel, which keeps
the whole attention matrix): `bash gpu_check.sh` measures the difference; until a GPU has run it, the
CUDA figures are the CPU kernel's.

Left out: the memory of several processes (each torchrun process holds all of this for its share of
the batch).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import allocate
import config
import logprobs
import lora
import model as qwen

GiB = 2 ** 30
PROMPT_TOKENS = 256  # the longest GSM8K prompt (question in Qwen2.5's chat template, system prompt included) is 247 tokens
MARGIN = 0.5 * GiB  # left free by the fitting search: CUDA context and fragmentation
CHUNKS = 4  # fp32 logit chunks alive at once in TokenLogProbs' backward (the chunk, /T, log-softmax, grad)


@dataclass
class Settings:
    """The run settings memory depends on (TrainConfig's, resolved)."""
    dtype: torch.dtype
    prompts_per_step: int
    num_generations: int
    max_new_tokens: int
    micro_batch: int
    grad_checkpointing: bool
    keep_kv_cache: bool  # the compiled decode step keeps its cache between steps
    prompt_tokens: int = PROMPT_TOKENS
    samples: bool = True  # GRPO samples; SFT learns from reference solutions and has no sampling phase
    dropout: float = 0.0  # LoRA dropout keeps an fp32 copy of each adapter's input (lora.LoRALinear)
    eval_batch: int = 0  # 0: no evaluation phase counted
    eval_max_new_tokens: int = 512
    eval_every: int = 0  # with a kept cache, periodic evaluations keep theirs through training


def predict(mcfg: qwen.ModelConfig, ranks: dict[str, int], s: Settings) -> dict[str, int]:
    """Bytes alive in each phase of one step: weights, adapters + AdamW, KV cache (kept or not),
    sampling, learn activations, logits; and the peak they add up to."""
    b = torch.finfo(s.dtype).bits // 8
    L, d, f, V = mcfg.num_hidden_layers, mcfg.hidden_size, mcfg.intermediate_size, mcfg.vocab_size
    kv_width = mcfg.num_key_value_heads * mcfg.head_dim
    n_weights, shapes = model_shape(mcfg)
    lora_params = sum(r * sum(shapes[p]) for p, r in ranks.items())
    adapted = sum(shapes[p][0] * shapes[p][1] for p, r in ranks.items() if r)
    n_rows = s.prompts_per_step * s.num_generations
    kv_bytes = lambda rows, length: 2 * L * kv_width * rows * (-(-length // 256) * 256 if s.keep_kv_cache else length) * b
    # each prompt's slots once, then K samples' tokens each (KVCache)
    kv = kv_bytes(s.prompts_per_step, s.prompt_tokens + s.num_generations * s.max_new_tokens) if s.samples else 0
    eval_kv = kv_bytes(s.eval_batch, s.prompt_tokens + s.eval_max_new_tokens)
    mb = min(s.micro_batch, n_rows)
    learn = activation_bytes(mcfg, ranks, s.dtype, prompts_in(mb, n_rows, s.num_generations if s.samples else 1), mb,
                             s.prompt_tokens, s.max_new_tokens, s.grad_checkpointing, s.dropout)
    logits = 2 * mb * (s.max_new_tokens + 1) * V * b + CHUNKS * logprobs.LOGIT_CHUNK_BYTES
    # the prefill's activations, one layer alive at a time and no graph (generate runs under no_grad)
    prefill = lambda rows: rows * s.prompt_tokens * (3 * f + 4 * d) * b
    kept = (kv if s.keep_kv_cache else 0) + (eval_kv if s.keep_kv_cache and s.eval_every else 0)
    phases = {"weights": n_weights * b, "adapters + AdamW": 16 * lora_params, "KV cache": kept,
              # the merge's copy, the cache unless kept, the prefill's activations
              "sampling": (adapted * b + (0 if s.keep_kv_cache else kv) + prefill(s.prompts_per_step)
                           if s.samples else 0),
              "learn activations": learn, "logits": logits,
              # the merge's copy, the cache unless kept during training, the prefill's activations
              "evaluation": (adapted * b + (0 if s.keep_kv_cache and s.eval_every else eval_kv) +
                             prefill(s.eval_batch) if s.eval_batch else 0)}
    persistent = phases["weights"] + phases["adapters + AdamW"] + phases["KV cache"]
    phases["peak"] = persistent + max(phases["sampling"], learn + logits, phases["evaluation"])
    return phases


def model_shape(mcfg: qwen.ModelConfig) -> tuple[int, dict[str, tuple[int, int]]]:
    """(parameter count, {projection path: (in, out)}), read from the model itself on the meta device."""
    key = tuple(mcfg.__dict__.items())
    if key not in _shapes:
        with torch.device("meta"):
            m = qwen.Qwen2(mcfg)
        linears = {p: (m.get_submodule(p).in_features, m.get_submodule(p).out_features) for p in lora.target_paths(m)}
        _shapes[key] = sum(p.numel() for p in m.parameters()), linears
    return _shapes[key]


_shapes: dict = {}


def prompts_in(micro_batch: int, n_rows: int, k: int) -> int:
    """The most prompts one micro-batch's rows continue (rows i*k .. i*k+k-1 continue prompt i)."""
    return max((min(a + micro_batch, n_rows) - 1) // k - a // k + 1 for a in range(0, n_rows, micro_batch))


def activation_bytes(mcfg: qwen.ModelConfig, ranks: dict[str, int], dtype: torch.dtype, prompts: int, rows: int,
                     prompt_tokens: int, n_completion: int, grad_checkpointing: bool, dropout: float = 0.0) -> int:
    """What autograd keeps for backward over one micro-batch of `rows` completions continuing `prompts`
    prompts, logits aside: our forward traced on the meta device with one and with two layers (the
    layers are alike, so the rest is arithmetic), at rank 1 everywhere, plus each adapter's r-wide
    product (4 bytes a token per unit of rank) where it is not folded into the weight."""
    # every saved tensor is per prompt or per completion: trace 1 prompt with 1 and with 2 completions
    def per(layers):
        one, two = (saved_bytes(mcfg, layers, dtype, n, prompt_tokens, n_completion, dropout) for n in (1, 2))
        return prompts * (2 * one - two) + rows * (two - one)
    one, two = per(1), per(2)
    per_layer, outside = two - one, 2 * one - two
    L = mcfg.num_hidden_layers
    tokens = prompts * prompt_tokens + rows * n_completion
    # an fp32 adapter without dropout is folded into its weight (lora.FoldedLoRA) and keeps no r-wide product
    folded = dtype == torch.float32 and dropout == 0
    lora_extra = 0 if folded else 4 * tokens * sum(max(r - 1, 0) for r in ranks.values())
    if not grad_checkpointing:
        return outside + L * per_layer + lora_extra
    # checkpointing keeps each block's input and recomputes one block at a time in backward
    block_input = tokens * mcfg.hidden_size * torch.finfo(dtype).bits // 8
    return outside + L * block_input + per_layer + lora_extra // L


def saved_bytes(mcfg: qwen.ModelConfig, layers: int, dtype: torch.dtype, rows: int, prompt_tokens: int,
                n_completion: int, dropout: float = 0.0) -> int:
    """Bytes of every tensor autograd saves in completion_logprobs_shared's forward (each storage once,
    parameters and the logits left out) for `rows` completions of one prompt, with a rank-1 LoRA model
    of `layers` layers, on the meta device."""
    key = (tuple(mcfg.__dict__.items()), layers, dtype, rows, prompt_tokens, n_completion, dropout)
    if key not in _saved:
        _saved[key] = _trace(qwen.ModelConfig(**{**mcfg.__dict__, "num_hidden_layers": layers}), dtype, rows,
                             prompt_tokens, n_completion, dropout)
    return _saved[key]


_saved: dict = {}  # the fitting search asks for the same shapes again


def _trace(cfg: qwen.ModelConfig, dtype: torch.dtype, rows: int, prompt_tokens: int, n_completion: int,
           dropout: float) -> int:
    with torch.device("meta"):
        m = qwen.Qwen2(cfg).to(dtype)
    m.requires_grad_(False)
    lora.apply_lora(m, r=1, alpha=1.0, dropout=dropout)
    m.train()
    skip, seen = {p.untyped_storage()._cdata for p in m.parameters()}, {}
    vocab = cfg.vocab_size

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in skip and t.shape[-1:] != (vocab,):  # the logits: logits()'s own term
            seen[key] = t.untyped_storage().nbytes()
        return t

    meta = dict(dtype=torch.long, device="meta")
    prompt, ids = torch.zeros(1, prompt_tokens, **meta), torch.zeros(rows, n_completion, **meta)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), flash_attention():
        logprobs.completion_logprobs_shared(m, prompt, torch.ones_like(prompt), torch.zeros(rows, **meta), ids,
                                        torch.ones_like(ids))
    return sum(seen.values())


class FlashLike(torch.autograd.Function):
    """Attention's output with what a flash kernel saves for backward (q, k, v, output, fp32 log-sum-exp
    per query and head, the mask): the meta device has no flash kernel, its SDPA saves the whole matrix."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("plan.FlashLike only counts memory")


@contextlib.contextmanager
def flash_attention():
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, attn_mask=None, **kw: FlashLike.apply(q, k, v, attn_mask)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def fitting(mcfg: qwen.ModelConfig, ranks: dict[str, int], s: Settings, gpu_bytes: float) -> tuple[int, int]:
    """The largest --micro-batch (at these --max-new-tokens) and the largest --max-new-tokens (a multiple
    of 64, at this --micro-batch) whose predicted peak fits gpu_bytes less MARGIN; 0 when none does.
    Memory grows with both, so each is found by bisection."""
    def fits(**kw):
        return predict(mcfg, ranks, Settings(**{**s.__dict__, **kw}))["peak"] <= gpu_bytes - MARGIN

    def largest(lo: int, hi: int, ok) -> int:  # the largest x in [lo, hi] with ok(x), or lo - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if ok(mid) else (lo, mid - 1)
        return hi

    mb = largest(1, s.prompts_per_step * s.num_generations, lambda m: fits(micro_batch=m))
    return max(mb, 0), 64 * max(largest(1, 128, lambda n: fits(max_new_tokens=64 * n)), 0)


def for_run(cfg: config.TrainConfig, device: str, gpu_memory: float | None = None, model=None) -> list[str]:
    """The plan's lines for a run's settings on `device`: of `model` when the run has built it (train.py's
    first lines), else of the model's config.json alone with the run's allocation applied on the meta
    device, no weights loaded (--plan). Adapters count at their capacity (dynamic: the upper bound)."""
    if model is None:
        mcfg = config.model_config(cfg)
        pattern, info = config.resolve_ranks(cfg, mcfg.num_hidden_layers)
        capacity = (allocate.bounds("proportional", mcfg.num_hidden_layers, info["budget"], cfg.r_min, cfg.r_max)[1]
                    if cfg.strategy == "dynamic" else None)  # as train.Run allocates them
        with torch.device("meta"):
            model = qwen.Qwen2(mcfg)
        lora.apply_lora(model, r=cfg.rank, alpha=cfg.alpha, rank_pattern=pattern, capacity=capacity)
    mcfg, ranks = model.config, {p: m.capacity for p, m in lora.lora_modules(model).items()}
    cuda = torch.device(device).type == "cuda"
    s = Settings(dtype=config.DTYPES[cfg.dtype] if cfg.dtype else qwen.default_dtype(torch.device(device)),
                 prompts_per_step=cfg.prompts_per_step, num_generations=cfg.num_generations,
                 max_new_tokens=cfg.max_new_tokens, micro_batch=cfg.micro_batch,
                 grad_checkpointing=cfg.grad_checkpointing, samples=cfg.algo == "grpo", dropout=cfg.dropout,
                 eval_batch=cfg.eval_batch, eval_max_new_tokens=cfg.eval_max_new_tokens, eval_every=cfg.eval_every,
                 keep_kv_cache=cfg.compile == "on" or (cfg.compile == "auto" and cuda))
    lines = report(predict(mcfg, ranks, s), s)
    if gpu_memory:
        mb, tokens = fitting(mcfg, ranks, s, gpu_memory * GiB)
        lines.append(f"fits {gpu_memory:g} GiB (with {MARGIN / GiB:g} GiB to spare): --micro-batch up to {mb} at "
                     f"--max-new-tokens {cfg.max_new_tokens}; --max-new-tokens up to {tokens} at "
                     f"--micro-batch {cfg.micro_batch}")
    return lines


def report(phases: dict[str, int], s: Settings) -> list[str]:
    """The plan's lines: the phase table, then `predicted peak: X GiB`."""
    lines = [f"memory plan (one step; prompts assumed {s.prompt_tokens} tokens, completions {s.max_new_tokens}, "
             f"micro-batch {s.micro_batch}{', gradient checkpointing' if s.grad_checkpointing else ''}):"]
    lines += [f"  {name:<18} {phases[name] / GiB:7.2f} GiB" for name in phases if name != "peak"]
    lines.append(f"predicted peak: {phases['peak'] / GiB:.1f} GiB")
    return lines


# ------------------------------------------------------------------ the plan against a measurement

def measure(layers: int, device: str, dtype: torch.dtype, s: Settings, rank: int = 32) -> tuple[int, int]:
    """(measured, predicted) peak bytes of one learn step (GRPO's backward and AdamW's step) of a
    random-weight model of Qwen2.5-1.5B's width with `layers` layers, r = `rank` on every projection;
    weights, adapters + AdamW, activations and logits all counted. On the CPU the peak is the process's
    resident high-water mark, reset by /proc/self/clear_refs (run with MALLOC_MMAP_THRESHOLD_=65536 so
    that freed tensors leave the resident set); on CUDA, torch.cuda.max_memory_allocated."""
    import gc

    import grpo
    dev = torch.device(device)
    cpu = dev.type == "cpu"
    resident = lambda field: next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(field))
    base = resident("VmRSS") if cpu else torch.cuda.memory_allocated(dev)
    mcfg = qwen.ModelConfig(num_hidden_layers=layers)
    m = qwen.Qwen2(mcfg).to(device=dev, dtype=dtype)
    m.init_weights(std=0.02)
    m.requires_grad_(False)
    ranks = lora.apply_lora(m, r=rank, alpha=2.0 * rank)
    opt = torch.optim.AdamW(lora.lora_parameters(m), lr=1e-4)
    n, Tc = s.prompts_per_step * s.num_generations, s.max_new_tokens
    prompts = torch.randint(0, mcfg.vocab_size, (s.prompts_per_step, s.prompt_tokens), device=dev)
    ids = torch.randint(0, mcfg.vocab_size, (n, Tc), device=dev)
    batch = grpo.Rollout(prompt_ids=prompts, prompt_attn=torch.ones_like(prompts), ids=ids, attn=torch.ones_like(ids),
                         mask=torch.ones(n, Tc, dtype=torch.bool, device=dev),
                         sampler_logp=torch.zeros(n, Tc, device=dev), rewards=torch.zeros(n, 1, device=dev),
                         total=torch.zeros(n, device=dev), advantages=torch.randn(n, device=dev), texts=[],
                         truncated=torch.zeros(n, dtype=torch.bool, device=dev),
                         lengths=torch.full((n,), Tc, device=dev))
    gcfg = grpo.GRPOConfig(num_generations=s.num_generations, max_new_tokens=Tc, micro_batch=s.micro_batch, beta=0.0)
    m.gradient_checkpointing = s.grad_checkpointing

    def step():
        opt.zero_grad(set_to_none=True)
        grpo.backward(m, batch, gcfg, first=True)
        opt.step()

    step()  # AdamW's moments exist from here on, as in every step but a run's first
    gc.collect()
    if cpu:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark starts again from what is resident now
    else:
        torch.cuda.reset_peak_memory_stats(dev)
    step()
    peak = resident("VmHWM") if cpu else torch.cuda.max_memory_allocated(dev)
    p = predict(mcfg, ranks, Settings(**{**s.__dict__, "dtype": dtype}))
    return peak - base, p["weights"] + p["adapters + AdamW"] + p["learn activations"] + p["logits"]


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="One learn step of a random-weight model of Qwen2.5-1.5B's width: "
                                             "its peak memory measured, beside the plan's prediction")
    ap.add_argument("--layers", type=int, default=28, help="[default: 28, the real depth]")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(config.DTYPES), help="[default: bf16 on CUDA, fp32 on the CPU]")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    dtype = config.DTYPES[args.dtype] if args.dtype else qwen.default_dtype(torch.device(args.device))
    s = Settings(dtype, args.prompts_per_step, args.num_generations, args.max_new_tokens, args.micro_batch,
                 args.grad_checkpointing, keep_kv_cache=False, prompt_tokens=args.prompt_tokens)
    measured, predicted = measure(args.layers, args.device, dtype, s)
    print(f"learn step peak: measured {measured / GiB:.2f} GiB, predicted {predicted / GiB:.2f} GiB "
          f"({(predicted - measured) / measured:+.1%})")


if __name__ == "__main__":
    main()
