"""Supervised fine-tuning of the same LoRA on GSM8K reference solutions: the regime GRPO is compared to.

The study explains its negative result by a difference of regimes: under SFT a few layers carry most
of the gradient, under GRPO it is spread flat. `python train.py --algo sft` trains the same adapters on
the reference solutions, written in the same <reasoning>/<answer> format, with the same profiler, so
`python profiler.py RUN_SFT RUN_GRPO` puts both regimes side by side. One step = one batch of
(prompt, reference completion) pairs, mean token cross-entropy over the completion, micro-batched.
"""

from __future__ import annotations

import time

import torch

import lora
import parallel
from grpo import optimizer_step
from gsm8k import prompt_text, reference_completion
from model import completion_logprobs, left_pad


def sft_batch(tokenizer, examples: list, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [N, Tp+Tc], attn, completion mask [N, Tc]): prompts left-padded, targets right-padded."""
    prompts = [tokenizer.encode(prompt_text(ex.question, tokenizer.chat)) for ex in examples]
    targets = [tokenizer.encode(reference_completion(ex)) + [tokenizer.im_end] for ex in examples]
    pids, pmask = left_pad(prompts, tokenizer.pad_id, device)
    Tc = max(len(t) for t in targets)
    tids = torch.full((len(targets), Tc), tokenizer.pad_id, dtype=torch.long)
    tmask = torch.zeros((len(targets), Tc), dtype=torch.long)
    for i, t in enumerate(targets):
        tids[i, :len(t)] = torch.tensor(t)
        tmask[i, :len(t)] = 1
    tids, tmask = tids.to(device), tmask.to(device)
    return torch.cat([pids, tids], 1), torch.cat([pmask, tmask], 1), tmask.bool()


def sft_step(model, tokenizer, optimizer, examples: list, micro_batch: int = 4, max_grad_norm: float = 1.0,
             scheduler=None, profiler=None) -> dict:
    """One optimiser step of token-mean cross-entropy on the reference completions."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    ids, attn, mask = sft_batch(tokenizer, examples, device)
    n_tokens, Tc = parallel.sum_int(int(mask.sum())), mask.shape[1]  # the mean over every rank's tokens
    params = lora.lora_parameters(model)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(0, len(examples), micro_batch):
        s = slice(i, i + micro_batch)
        logp, _ = completion_logprobs(model, ids[s], attn[s], Tc)
        loss = -torch.where(mask[s], logp, 0.0).sum() / n_tokens  # this micro-batch's share of the mean
        loss.backward()
        total += loss.item()
    total = float(parallel.all_reduce_sum(torch.tensor(total, dtype=torch.float64, device=device)))
    grad_norm = optimizer_step(params, optimizer, scheduler, profiler, max_grad_norm)
    optimizer.zero_grad(set_to_none=True)
    return {"loss": total, "grad_norm": grad_norm, "tokens": int(mask.sum()), "lr": optimizer.param_groups[0]["lr"],
            "time_learn": time.perf_counter() - t0}
