"""The learner's log-probabilities of completions, from our model's forward pass.

completion_logprobs takes whole sequences (prompt then completion); completion_logprobs_shared takes
completions that continue shared prompts (GRPO's K samples of a prompt) and runs each prompt's forward
once for all of them (model.SharedPrompts), which is what grpo.py's learn step uses. Both give fp32
log softmax(logits / T) at each completion token, and its entropy on request, from logits kept in the
model's dtype and cast to fp32 one chunk at a time (TokenLogProbs), so no vocabulary-sized fp32
tensor of the whole batch is ever alive.

Left out: the loss (grpo.py, sft.py), sequence packing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import PromptKV, SharedPrompts

LOGIT_CHUNK_BYTES = 16 * 2**20  # one chunk of fp32 logits (a few such are alive at once, never the whole batch)


def completion_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, n_completion: int, entropy: bool = False,
                        temperature: float = 1.0):
    """fp32 log-probs [N, Tc] of the last Tc tokens of ids [N, T] under softmax(logits / temperature)
    (and that distribution's entropy there). GRPO passes its sampling temperature, so the policy it
    trains is the one that sampled (as TRL does).

    The logits stay in the model's dtype; a chunk of positions is cast to fp32 only while it is used,
    so no vocabulary-sized fp32 tensor of the whole batch is ever alive (TokenLogProbs)."""
    logits = model(ids, attn, num_logits=n_completion + 1)  # (N, Tc + 1, V); position t predicts t + 1
    return _token_logprobs(logits, ids[:, -n_completion:], entropy, temperature)


def completion_logprobs_shared(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, rows: torch.Tensor,
                               ids: torch.Tensor, mask: torch.Tensor, entropy: bool = False,
                               temperature: float = 1.0):
    """completion_logprobs of completions ids [N, Tc] (mask [N, Tc]) that continue left-padded prompts
    [G, Tp] (rows [N]: which prompt each continues), with each prompt's forward run once for all the
    rows that continue it (SharedPrompts): the same values, and gradients summed in another order."""
    kv = PromptKV()
    last = model.hidden_states(prompt_ids, prompt_mask, kv)[:, -1:]  # (G, 1, C): predicts token 0
    h = model.hidden_states(ids, mask, SharedPrompts(kv, prompt_mask, rows))  # (N, Tc, C)
    logits = model.lm_head(model.model.norm(torch.cat([last[rows], h], 1)))  # (N, Tc + 1, V)
    return _token_logprobs(logits, ids, entropy, temperature)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, entropy: bool, temperature: float):
    """(log-probs [N, Tc] of targets, entropy [N, Tc] or None) from logits [N, Tc + 1, V]."""
    logp = TokenLogProbs.apply(logits, targets, temperature)
    if not entropy:
        return logp, None
    ent = torch.empty_like(logp)
    with torch.no_grad():
        for rows in logit_chunks(logits.shape):
            lp = fp32_scaled(logits[rows], temperature).log_softmax(-1)
            ent[rows] = -(lp.exp() * lp).sum(-1)
    return logp, ent


def logit_chunks(shape: torch.Size):
    """Indices (n, positions) covering logits [N, Tc + 1, V] but the last position, which predicts
    nothing, about LOGIT_CHUNK_BYTES of fp32 at a time."""
    N, T, V = shape
    step = max(1, LOGIT_CHUNK_BYTES // (4 * V))
    for n in range(N):
        for t in range(0, T - 1, step):
            yield n, slice(t, min(t + step, T - 1))


def fp32_scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    x = x.float()
    return x / temperature if temperature != 1.0 else x


class TokenLogProbs(torch.autograd.Function):
    """log softmax(logits / T) at the target tokens [N, Tc], chunk by chunk (logit_chunks).

    It saves the logits as the model returned them and nothing vocabulary-sized besides; backward
    recomputes one chunk's log-softmax at a time under autograd and backpropagates through it, with the
    kernels cross_entropy uses on the whole batch, so values and gradients are bit for bit those of the
    unchunked computation (tested)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        ctx.save_for_backward(logits, targets)
        ctx.temperature = temperature
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        for rows in logit_chunks(logits.shape):
            out[rows] = -F.cross_entropy(fp32_scaled(logits[rows], temperature), targets[rows], reduction="none")
        return out

    @staticmethod
    def backward(ctx, grad):
        logits, targets = ctx.saved_tensors
        out = torch.zeros_like(logits)  # the last position predicts nothing: its gradient stays 0
        for rows in logit_chunks(logits.shape):
            with torch.enable_grad():
                x = logits[rows].detach().requires_grad_()
                logp = -F.cross_entropy(fp32_scaled(x, ctx.temperature), targets[rows], reduction="none")
                out[rows] = torch.autograd.grad(logp, x, grad[rows])[0]
        return out, None, None
