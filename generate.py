"""Batched sampling for GRPO: prefill each prompt once, then decode K samples that share its cache.

The decode step has fixed shapes (model.KVCache attends over all its slots behind an additive mask,
and its write position lives on the device), so `generate(compile=True)` compiles it once per shape
and, on a GPU, replays it as a CUDA graph: one launch per token, sampling included (on the CPU a
generated C++ wrapper calls its kernels, with no Python between them). Sampling draws one uniform
per row and inverts the cumulative distribution, so nothing waits on the host per token.

Each drawn token comes with its log-probability under the sampler's own forward pass (merged LoRA, the
sampling dtype), so GRPO can measure, and correct for, any gap between the policy that sampled and
the policy that learns (grpo.py).

(The design card puts sampling in model.py. It lives here, as in gpt-fast, since the compiled,
static-shape decode made it an idea of its own and took model.py past 600 lines.)

Left out: beam search, repetition penalties, speculative decoding, paged or continuous batching.

    from generate import generate
    out, mask, logp = generate(model, prompts, max_new_tokens=512, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                         num_samples=4, temperature=1.0, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from model import KVCache, Qwen2, left_pad


def generate(model: Qwen2, prompts: list[list[int]], *, max_new_tokens: int, stop_ids, pad_id: int,
             num_samples: int = 1, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             stop_check_every: int | None = None, noise_rows: tuple[int, int] | None = None,
             compile: bool = False):
    """Sample `num_samples` completions of each prompt with a KV cache.

    Returns (tokens [B*n, T_new], mask [B*n, T_new], logprobs [B*n, T_new]): row i*n+j is sample j of
    prompt i; the mask is 1 up to and including the first stop token, 0 after it (those positions hold
    pad_id, log-prob 0). logprobs are fp32 log-probabilities of the drawn tokens under softmax(logits / T),
    before top-k/top-p truncation (the distribution GRPO's learner computes), T = 1 when greedy. compile=True
    runs the decode step through torch.compile (as a CUDA graph on a GPU): the same tokens, faster
    once compiled, which takes seconds per new batch size or length bucket. Eager decoding drops a
    prompt from the batch once its samples have all stopped; a compiled step keeps its shapes. Finished
    prompts are looked for every `stop_check_every` tokens (each look syncs with the host): 1 on the
    CPU, 16 on a GPU.
    """
    # inference_mode skips autograd's bookkeeping on every op; its tensors cannot enter a backward
    # later (GRPO trains on these tokens), so the results are cloned outside it.
    with torch.inference_mode():
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        ids, mask = left_pad(prompts, pad_id, device)
        B, T0 = ids.shape
        N = B * num_samples
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if T0 + max_new_tokens > model.config.max_position_embeddings:
            raise ValueError(f"prompt of {T0} tokens + {max_new_tokens} new tokens exceeds the context "
                             f"({model.config.max_position_embeddings})")
        slots = T0 + num_samples * max_new_tokens  # each prompt once, then each sample's tokens (KVCache)
        if compile:
            step, cache = compiled_decoder(model, B, num_samples, slots, device, dtype)
        else:
            step, cache = decode_step, KVCache(model.config, B, slots, device, dtype, samples=num_samples)
        logits = model(ids, mask, cache=cache, num_logits=1)[:, -1]  # prefill each prompt once: (B, V)
        logits = logits.repeat_interleave(num_samples, dim=0)  # (N, V): its K samples' first token

        rows = torch.arange(N, device=device)  # the rows of the output being decoded (all until prompts leave)

        def draw():  # this step's uniforms, for the rows still decoded (greedy decoding draws none)
            if temperature == 0:
                return None
            u = uniforms(N, generator, device, noise_rows)
            return u if len(rows) == N else u[rows]

        nxt = sample_next(logits, temperature, top_k, top_p, draw())
        nxt_logp = token_logprob(logits, nxt, temperature)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        out = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logp = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)
        done = torch.zeros(N, dtype=torch.bool, device=device)
        # every row's tokens and log-probs; out and logp hold the rows still decoded (the same tensors
        # until a prompt leaves the batch, its rows then written here)
        all_out, all_logp = out, logp
        n_done = 0  # rows found stopped at the last check
        # Counting the rows that have stopped syncs with the host; on a GPU do it only every few tokens.
        every = stop_check_every or (16 if device.type == "cuda" else 1)
        for t in range(max_new_tokens):
            real = ~done  # rows still writing; finished rows get padding the model will not attend to
            tok = torch.where(real, nxt, pad_id)
            out[:, t] = tok
            logp[:, t] = torch.where(real, nxt_logp, 0.0)
            done = done | torch.isin(tok, stops)
            if t + 1 == max_new_tokens:
                break
            if (t + 1) % every == 0:
                now_done = int(done.sum())
                if now_done == len(rows):
                    break
                if not compile and now_done > n_done:
                    # Eager decoding drops prompts whose samples have all stopped: a batch's groups stop
                    # at different lengths (a fifth of the organism's first rollout's row-steps came
                    # after their group had stopped). A compiled step keeps its shapes and computes them.
                    finished = done.view(-1, num_samples).all(1)  # (prompts,)
                    if bool(finished.any()):
                        cache.keep((~finished).nonzero()[:, 0])
                        finished = finished.repeat_interleave(num_samples)  # (rows,)
                        stay, gone = (~finished).nonzero()[:, 0], finished.nonzero()[:, 0]
                        all_out[rows[gone]], all_logp[rows[gone]] = out[gone], logp[gone]
                        rows, out, logp, done, tok, real = (x[stay] for x in (rows, out, logp, done, tok, real))
                        now_done -= len(gone)
                    n_done = now_done
            if compile:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's output is consumed
            # Dynamo checks some 400 guards before each compiled call (5-10% of a small step). This call's
            # first step checks them all (and recompiles if needed); the later ones differ from it only in
            # tensor values, never in what the guards test, so they skip them.
            with (torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if compile and t > 0
                  else contextlib.nullcontext()):
                nxt, nxt_logp = step(model, tok, real, cache, draw(), temperature, top_k, top_p)
        if len(rows) < N:  # the rows decoded to the end
            all_out[rows], all_logp[rows] = out, logp
        out, logp = all_out[:, :t + 1], all_logp[:, :t + 1]
        # mask: real tokens up to and including the first stop
        is_stop = torch.isin(out, stops)
        after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
        mask = (~after_stop).long()
    return out.clone(), mask.clone(), logp.clone()


# ------------------------------------------------------------------------------- the decode step

def decode_step(model: Qwen2, tok: torch.Tensor, real: torch.Tensor, cache: KVCache, u: torch.Tensor | None,
                temperature: float, top_k: int | None, top_p: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token [N] and its log-prob [N] after one new token per row (tok [N]; real [N] False for
    rows that have finished).

    Sampling is part of the step, so a compiled step fuses it and a CUDA graph replays it; the random
    numbers u come from outside, where the generator lives.
    """
    logits = model(tok[:, None], real[:, None], cache=cache)[:, -1]  # (N, V)
    nxt = sample_next(logits, temperature, top_k, top_p, u)
    return nxt, token_logprob(logits, nxt, temperature)


_COMPILED: "weakref.WeakKeyDictionary[Qwen2, dict]" = weakref.WeakKeyDictionary()


def compiled_decoder(model: Qwen2, rows: int, samples: int, max_len: int, device, dtype):
    """(compiled decode_step, an empty KV cache for it), kept per model and per shape and reused.

    A CUDA graph replays fixed addresses, so each shape's cache outlives the generate call and is
    reused by the next one of that shape; lengths are rounded up to a multiple of 256 so that varying
    prompt lengths share a handful of graphs (each new shape compiles once; torch.compile keeps at most 8).
    """
    max_len = -(-max_len // 256) * 256
    entry = _COMPILED.setdefault(model, {"caches": {}})
    if "step" not in entry:
        if torch.device(device).type == "cuda":  # replayed as a CUDA graph: one launch per token
            entry["step"] = torch.compile(decode_step, fullgraph=True, dynamic=False, mode="reduce-overhead")
        else:  # a small step is mostly call overhead, so inductor's C++ wrapper calls the kernels, not Python
            entry["step"] = torch.compile(decode_step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    key = (rows, samples, max_len, dtype, str(device))
    if key not in entry["caches"]:
        cache = KVCache(model.config, rows, max_len, device, dtype, samples=samples)
        for t in cache.tensors():  # static inputs of the graph, updated in place
            torch._dynamo.mark_static_address(t)
        entry["caches"][key] = cache
    entry["caches"][key].reset()
    return entry["step"], entry["caches"][key]


# ------------------------------------------------------------------------------------- sampling

def uniforms(n: int, generator: torch.Generator | None, device, noise_rows: tuple[int, int] | None = None):
    """The random numbers of one sampling step: one uniform in [0, 1) per row, [n, 1] float64.

    noise_rows = (offset, total): these n rows are rows offset.. of a batch of `total` sampled with the
    same generator (data parallelism): the whole batch's draws are made and this slice used, so every
    row gets the draw it would get in a single process.
    """
    offset, total = noise_rows or (0, n)
    u = torch.rand((total, 1), generator=generator, device=device, dtype=torch.float64)
    return u[offset:offset + n]


def token_logprob(logits: torch.Tensor, tok: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log softmax(logits / T)[tok] per row (T = 1 when greedy): what the learner computes for tok."""
    z = logits.float() / temperature if temperature not in (0, 1) else logits.float()
    return z.gather(-1, tok[:, None])[:, 0] - z.logsumexp(-1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                u: torch.Tensor | None) -> torch.Tensor:
    """One token per row from logits [N, V] and uniforms u [N, 1] (see `uniforms`); greedy at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    # Inverse-CDF sampling: token i owns [cdf[i-1], cdf[i]) of [0, 1) and the row's uniform picks one,
    # with no host sync (unlike torch.multinomial) and one random number per row rather than one per
    # vocabulary entry. float64 keeps the intervals exact down to probabilities of ~1e-16 over a 152k
    # vocabulary; dividing by the last entry makes it exactly 1 (x / x), so a draw in [0, 1) always lands
    # on a token, and a filtered-out token owns an empty interval and is never picked.
    cdf = probs.double().cumsum(-1)  # (N, V)
    cdf = cdf / cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0]
