"""Supervised fine-tuning of the same LoRA on GSM8K reference solutions: the regime GRPO is compared to.

The study explains its negative result by a difference of regimes: under SFT a few layers carry most
of the gradient, under GRPO it is spread flat. `python train.py --algo sft` trains the same adapters on
the reference solutions, written in the same <reasoning>/<answer> format, with the same profiler, so
`python profiler.py RUN_SFT RUN_GRPO` puts both regimes side by side. One step = one batch of
(prompt, reference completion) pairs, mean token cross-entropy over the completion, micro-batched.

Left out: the optimiser and everything after the backward pass (train.py's loop, shared with GRPO),
packing, loss on the prompt tokens.
"""

from __future__ import annotations

import torch

import parallel
from gsm8k import prompt_text, reference_completion
from logprobs import completion_logprobs
from model import left_pad


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


def backward(model, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor, micro_batch: int = 4) -> dict:
    """Token-mean cross-entropy on the reference completions, backpropagated micro-batch by micro-batch
    into the adapters' .grad; returns the batch's loss (all data-parallel ranks) and its tokens."""
    n_tokens, Tc = parallel.sum_int(int(mask.sum())), mask.shape[1]  # the mean over every rank's tokens
    model.train()
    total = 0.0
    for i in range(0, len(ids), micro_batch):
        s = slice(i, i + micro_batch)
        logp, _ = completion_logprobs(model, ids[s], attn[s], Tc)
        loss = -torch.where(mask[s], logp, 0.0).sum() / n_tokens  # this micro-batch's share of the mean
        loss.backward()
        total += loss.item()
    total = float(parallel.all_reduce_sum(torch.tensor(total, dtype=torch.float64, device=ids.device)))
    return {"loss": total, "tokens": int(mask.sum())}
