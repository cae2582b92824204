"""GRPO (Shao et al., DeepSeekMath, arXiv 2402.03300) on a LoRA-adapted model: rollout and loss.

What it implements, in the order of the paper's objective (train.py's loop calls these in this order):
  1. rollout(): sample K completions for each of B prompts from the current policy (LoRA merged for speed) at
     temperature T; the sampler also returns each drawn token's log-probability.
  2. Score each completion with every reward function; the reward is their weighted sum.
  3. Group-relative advantages A_i = (r_i - mean(r_group)) / (std(r_group) + eps); without the division
     with `scale_rewards=False` (Dr. GRPO, arXiv 2503.20783). A group whose rewards are all equal has
     A = 0 and teaches nothing.
  4. reference_logprobs(), then backward(): per-token log-probabilities (fp32) of each completion
     under softmax(logits / T), the distribution that was sampled (as TRL does), for the current
     policy, the policy at sampling time (differs only when `num_iterations` > 1) and the reference
     policy, which is the same model with its adapters disabled (no second copy of the weights).
     top-p/top-k truncation is not corrected for (as in TRL).
  5. Per token: -w·min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A) + β·KL, with ρ = π/π_old, the k3 estimator
     KL = exp(ref - logp) - (ref - logp) - 1, and w the truncated importance weight
     min(π_old / π_sampler, `is_cap`) of the token, not applied to the KL term: token-level truncation,
     TRL's `token_truncate` mode and verl's token-level `truncate` (TRL's default mode is `sequence_mask`,
     which drops whole sequences instead). The sampler runs merged LoRA in the model's dtype, the learner
     unmerged fp32 adapters, and in bf16 the merge's rounding makes the two policies differ;
     `logp_mismatch_mean`/`_max` log the gap |log π_old - log π_sampler| every step (~1e-6 in fp32;
     the bf16 measurements are in BENCH.md). The loss is aggregated by `loss_type`:
       grpo     mean over each completion's tokens, then over completions (the paper's 1/|o_i|)
       dapo     mean over all tokens of the batch (DAPO, arXiv 2503.14476): long answers are not
                down-weighted per token
       dr_grpo  sum over tokens / (completions x max_new_tokens) (Dr. GRPO): no length normalisation
     The default is `grpo`, the paper's formula, which is what the study names.
  6. backward() backpropagates in micro-batches (the normalisers are computed over the whole batch, so
     the sum of the micro-batch losses is exactly the batch loss). Each prompt's forward runs once for
     the K completions that continue it (model.SharedPrompts), and each micro-batch is cut to its own
     longest prompt and completion: the same log-probs to rounding, a fraction of the work. With β = 0
     a group whose rewards all tie (advantages exactly 0) adds exactly nothing to the loss or gradient,
     and is skipped (`with_signal`); entropy and the sampler-learner gap are then logged over the
     tokens learned from, and `learned` is the share of completions learned from. What
     follows the backward pass, the gradient all-reduce, the profiler's record(), clipping and the
     optimiser step, is train.py's.
  `clip_frac` counts the clipping that is active (ρ > 1+ε_high with A > 0, ρ < 1-ε_low with A < 0),
  as TRL's clip_ratio/region_mean does.

Left out: the optimiser and everything after the backward pass (train.py), reward models, a separate
reference model, vLLM, sequence packing. Precision: on CUDA the frozen base weights are bf16, LoRA
weights, gradients and AdamW state fp32, log-probs fp32; fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

import lora
import parallel
from generate import generate
from logprobs import completion_logprobs_shared
from model import left_pad

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


@dataclass
class GRPOConfig:
    num_generations: int = 4  # K completions per prompt
    max_new_tokens: int = 512
    temperature: float = 1.0  # sampling and learning: both use softmax(logits / T)
    top_p: float = 1.0
    top_k: int | None = None
    beta: float = 0.04  # KL weight; 0 skips the reference pass entirely
    eps_low: float = 0.2
    eps_high: float = 0.2
    loss_type: str = "grpo"
    scale_rewards: bool = True  # divide advantages by the group's std (False: Dr. GRPO)
    adv_eps: float = 1e-4
    num_iterations: int = 1  # optimiser passes over one sampled batch
    mask_truncated: bool = False  # drop completions that hit max_new_tokens without a stop token
    micro_batch: int = 4  # sequences per forward/backward
    merge_for_sampling: bool = True
    compile_decode: bool = False  # torch.compile the decode step (a CUDA graph on a GPU)
    is_cap: float = 3.0  # truncated importance weight min(π_old/π_sampler, cap) per token (TRL's C_max); 0: off

    def __post_init__(self):  # each message opens with the field's name (config.py turns it into the flag)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} unknown; allowed: {', '.join(LOSS_TYPES)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature {self.temperature}: GRPO samples, so it must be > 0")
        if self.is_cap < 0:
            raise ValueError(f"is_cap {self.is_cap}: must be >= 0 (0 turns the correction off)")


# ------------------------------------------------------------------------------ pure computations

def group_advantages(rewards: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards [B*K] laid out group by group."""
    r = rewards.view(-1, k)
    adv = r - r.mean(-1, keepdim=True)
    if scale:
        adv = adv / (r.std(-1, keepdim=True) + eps)  # std is unbiased (n-1), as in TRL
    return adv.flatten()


def per_token_loss(logp, old_logp, ref_logp, adv, mask, beta, eps_low, eps_high, is_weight=None):
    """The clipped surrogate (times the importance weight, when given) plus β·k3-KL at each token;
    tensors [N, T], adv [N]. Returns (loss, ratio, kl).

    Masked positions are zeroed first, so whatever they hold (padding, -inf) never reaches a gradient.
    """
    logp, old_logp, ref_logp = (x.masked_fill(~mask, 0.0) for x in (logp, old_logp, ref_logp))
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    loss = -surrogate if is_weight is None else -surrogate * is_weight.masked_fill(~mask, 0.0)
    kl = torch.zeros_like(logp)
    if beta != 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
    return loss, ratio, kl


def importance_weight(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight min(π_old / π_sampler, cap) per token, no gradient (TRL's token_truncate)."""
    return torch.exp(old_logp - sampler_logp).clamp(max=cap).detach()


def active_clipping(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """Tokens where the clip is active: ratio above 1+ε_high with A > 0, or below 1-ε_low with A < 0."""
    a = adv[:, None]
    return ((ratio > 1 + eps_high) & (a > 0)) | ((ratio < 1 - eps_low) & (a < 0))


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, n_seqs: int, n_tokens: int,
              max_new_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the batch loss; `n_seqs`/`n_tokens` are whole-batch totals."""
    loss = torch.where(mask, loss, 0.0)  # where, not multiply: a masked NaN/inf must not leak
    if loss_type == "grpo":
        return (loss.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seqs
    if loss_type == "dapo":
        return loss.sum() / max(n_tokens, 1)
    if loss_type == "dr_grpo":
        return loss.sum() / (n_seqs * max_new_tokens)
    raise ValueError(f"loss_type {loss_type!r} unknown; allowed: {LOSS_TYPES}")


# ------------------------------------------------------------------------------------- the step

@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, Tp) the prompts, left-padded; completions i*K .. i*K+K-1 continue prompt i
    prompt_attn: torch.Tensor  # (B, Tp)
    ids: torch.Tensor  # (N, Tc) the completions, padded after their stop token
    attn: torch.Tensor  # (N, Tc) 1 up to and including the stop token
    mask: torch.Tensor  # (N, Tc) bool: completion tokens that count in the loss
    sampler_logp: torch.Tensor  # (N, Tc) fp32 log-probs of the drawn tokens under the sampler's forward
    rewards: torch.Tensor  # (N, F) each reward function's score
    total: torch.Tensor  # (N,) their weighted sum
    advantages: torch.Tensor  # (N,)
    texts: list[str]
    truncated: torch.Tensor  # (N,) bool: no stop token within max_new_tokens
    lengths: torch.Tensor  # (N,) completion tokens including the stop token
    times: dict = field(default_factory=dict)
    ref_logp: torch.Tensor | None = None  # (N, Tc) under the reference policy (reference_logprobs)
    old_logp: torch.Tensor | None = None  # (N, Tc) under the sampling policy, when num_iterations > 1

    def groups(self, keep: torch.Tensor) -> tuple["Rollout", torch.Tensor]:
        """(the rollout of the prompts `keep` [G] (indices, in order) and their K completions, those
        completions' rows here [G*K])."""
        K = len(self.ids) // len(self.prompt_ids)
        rows = (keep[:, None] * K + torch.arange(K, device=keep.device)).flatten()
        return replace(self, prompt_ids=self.prompt_ids[keep], prompt_attn=self.prompt_attn[keep],
                       texts=[self.texts[i] for i in rows.tolist()] if self.texts else [],
                       **{f: None if getattr(self, f) is None else getattr(self, f)[rows] for f in PER_ROW}), rows

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attn) [N, Tp + Tc]: each completion behind its own copy of its prompt."""
        K = len(self.ids) // len(self.prompt_ids)
        return (torch.cat([self.prompt_ids.repeat_interleave(K, 0), self.ids], 1),
                torch.cat([self.prompt_attn.repeat_interleave(K, 0), self.attn], 1))


PER_ROW = ("ids", "attn", "mask", "sampler_logp", "rewards", "total", "advantages", "truncated", "lengths",
           "ref_logp", "old_logp")  # Rollout's fields with one entry per completion


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[list[int]], examples: list, reward_fns: dict, weights: dict,
            cfg: GRPOConfig, generator: torch.Generator) -> Rollout:
    """Sample K completions per prompt, score them, and compute group-relative advantages."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    n = len(prompts) * cfg.num_generations  # data parallel: rows n*rank.. of the global batch
    sample = dict(max_new_tokens=cfg.max_new_tokens, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                  num_samples=cfg.num_generations, temperature=cfg.temperature, top_k=cfg.top_k,
                  top_p=cfg.top_p, generator=generator, noise_rows=(parallel.rank() * n, parallel.world() * n),
                  compile=cfg.compile_decode)
    with lora.merged(model) if cfg.merge_for_sampling else contextlib.nullcontext():
        out, cmask, sampler_logp = generate(model, prompts, **sample)
    model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()

    lengths = cmask.sum(-1)
    stops = torch.tensor(tokenizer.stop_ids, device=device)
    last = out.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    truncated = ~torch.isin(last, stops)
    texts = [tokenizer.decode(row[:n]) for row, n in zip(out.tolist(), lengths.tolist())]
    K = cfg.num_generations
    names = list(reward_fns)
    scores = torch.tensor([[reward_fns[n](text, examples[i // K]) for n in names] for i, text in enumerate(texts)],
                          dtype=torch.float32, device=device).view(len(texts), len(names))
    total = scores @ torch.tensor([weights.get(n, 1.0) for n in names], device=device)
    advantages = group_advantages(total, K, cfg.scale_rewards, cfg.adv_eps)
    t2 = time.perf_counter()

    pids, pmask = left_pad(prompts, tokenizer.pad_id, device)
    mask = cmask.bool()
    if cfg.mask_truncated:
        mask = mask & ~truncated[:, None]
    return Rollout(prompt_ids=pids, prompt_attn=pmask, ids=out, attn=cmask, mask=mask,
                   sampler_logp=sampler_logp, rewards=scores, total=total, advantages=advantages, texts=texts,
                   truncated=truncated, lengths=lengths,
                   times={"sample": t1 - t0, "score": t2 - t1})


def micro_batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def logprobs(model, batch: Rollout, s: slice, entropy: bool, temperature: float):
    """completion_logprobs of the rows s, each prompt's forward run once for its rows there (SharedPrompts),
    on the micro-batch cut to its own longest prompt and completion: the rest would be padding, which
    changes no log-prob and costs time. Returns [n, Tc] (and the entropy, or None), zero past the cut."""
    N, Tc = batch.ids.shape
    K = N // len(batch.prompt_ids)
    g = slice(s.start // K, (s.stop - 1) // K + 1)  # the prompts these rows continue
    pmask, cmask = batch.prompt_attn[g], batch.attn[s]
    first = int(pmask.any(0).long().argmax())  # left padding that none of these prompts needs
    n = int(cmask.sum(-1).max())  # the longest completion here (each row's tokens come first)
    rows = torch.arange(s.start, s.stop, device=cmask.device) // K - g.start
    logp, ent = completion_logprobs_shared(model, batch.prompt_ids[g, first:], pmask[:, first:], rows,
                                           batch.ids[s, :n], cmask[:, :n], entropy, temperature)
    return F.pad(logp, (0, Tc - n)), None if ent is None else F.pad(ent, (0, Tc - n))


@torch.no_grad()
def reference_logprobs(model, batch: Rollout, cfg: GRPOConfig):
    """Fill in the log-probs the loss compares against, without gradient: the reference policy's (the
    adapters disabled; skipped when β = 0) and the sampling policy's (only when `num_iterations` > 1:
    with one pass the policy is the sampling policy, and its detached log-probs serve)."""
    def logps(b: Rollout):
        return torch.cat([logprobs(model, b, s, False, cfg.temperature)[0]
                          for s in micro_batches(len(b.ids), cfg.micro_batch)])

    if cfg.beta != 0:
        with lora.disable_adapters(model):
            batch.ref_logp = logps(batch)
    if cfg.num_iterations > 1:  # the sampling policy, frozen for all passes over this batch, computed in the
        learn, rows = with_signal(batch, cfg)  # micro-batches backward() uses: the first ratio is exactly 1
        if rows is None:
            batch.old_logp = logps(learn)
        else:  # the tied groups' rows are never read
            batch.old_logp = torch.zeros_like(batch.sampler_logp)
            if len(rows):
                batch.old_logp.index_copy_(0, rows, logps(learn))


def backward(model, batch: Rollout, cfg: GRPOConfig, first: bool = True) -> dict:
    """The GRPO loss of the whole batch, backpropagated micro-batch by micro-batch into the adapters'
    .grad; returns the loss and its statistics over the batch (all data-parallel ranks). With
    `first`, also the entropy, the sampler-learner gap and the mean importance weight, over the tokens
    learned from (`with_signal`)."""
    model.train()
    # normalisers over the whole batch, across data-parallel ranks too, so micro-batch losses sum to it
    N, n_tokens = parallel.sum_int(len(batch.mask)), parallel.sum_int(int(batch.mask.sum()))
    learn, _ = with_signal(batch, cfg)
    device = batch.ids.device
    # over valid tokens: kl, active clips, entropy, |logp_old - logp_sampler|, importance weight, tokens; the loss
    sums, gap_max = torch.zeros(7, device=device), torch.zeros((), device=device)
    for s in micro_batches(len(learn.mask), cfg.micro_batch):
        logp, ent = logprobs(model, learn, s, first, cfg.temperature)
        old = logp.detach() if learn.old_logp is None else learn.old_logp[s]
        ref = logp.detach() if learn.ref_logp is None else learn.ref_logp[s]
        m = learn.mask[s]
        w = importance_weight(old, learn.sampler_logp[s], cfg.is_cap) if cfg.is_cap else None
        tok_loss, ratio, kl = per_token_loss(logp, old, ref, learn.advantages[s], m, cfg.beta, cfg.eps_low,
                                             cfg.eps_high, w)
        loss = aggregate(tok_loss, m, cfg.loss_type, N, n_tokens, cfg.max_new_tokens)
        loss.backward()
        with torch.no_grad():
            clipped = active_clipping(ratio, learn.advantages[s], cfg.eps_low, cfg.eps_high)
            ent_sum = (ent * m).sum() if ent is not None else torch.zeros((), device=device)
            gap = torch.where(m, (old - learn.sampler_logp[s]).abs(), 0.0)
            w_sum = (w * m).sum() if w is not None else m.sum()
            sums += torch.stack([(kl * m).sum(), (clipped * m).sum(), ent_sum, gap.sum(), w_sum, m.sum(),
                                 loss.detach()])
            gap_max = torch.maximum(gap_max, gap.max())
    for p in model.parameters():  # nothing learned here: a zero gradient, as a backward of a zero loss gives
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    sums = parallel.all_reduce_sum(sums)
    kl_mean, clip_mean = (sums[:2] / max(n_tokens, 1)).tolist()
    n_learned = sums[5].item()
    ent_mean, gap_mean, w_mean = (sums[2:5] / n_learned).tolist() if n_learned else (None,) * 3
    stats = {"kl": kl_mean, "clip_frac": clip_mean, "loss": sums[6].item(),
             "learned": parallel.sum_int(len(learn.mask)) / N}
    if first:
        stats.update(entropy=ent_mean, logp_mismatch_mean=gap_mean, is_weight_mean=w_mean,  # None: none learned
                     logp_mismatch_max=gap_max.item() if n_learned else None)
    return stats


def with_signal(batch: Rollout, cfg: GRPOConfig) -> tuple[Rollout, torch.Tensor | None]:
    """(the groups the loss can learn from, their rows in batch; None when that is all of them).

    With β = 0, a group whose rewards all tie has advantages of exactly 0, so every token's loss is
    -w·min(ρ·0, clip(ρ)·0) = 0 and its gradient exactly 0: its forward and backward change nothing and
    are skipped (on the organism, a quarter of the groups on average). With β > 0 the KL term still pulls
    on every completion, and every group is learned from. (A tied group's mean is exact, and its
    advantages 0, when the rewards are sums of binary fractions, as with the default weights 1 and 0.5;
    with other weights they may come out at rounding size, and such a group is learned from as before.)"""
    if cfg.beta != 0:
        return batch, None
    K = len(batch.ids) // len(batch.prompt_ids)
    signal = batch.advantages.view(-1, K).ne(0).any(-1)
    return (batch, None) if bool(signal.all()) else batch.groups(signal.nonzero()[:, 0])


def rollout_metrics(batch: Rollout, reward_names: list[str], num_generations: int) -> dict:
    """What was sampled and how it scored, as plain numbers for the step's log line."""
    total = batch.total
    grouped = total.view(-1, num_generations)
    metrics = {"reward": total.mean().item(), "reward_std": total.std().item() if total.numel() > 1 else 0.0}
    for j, name in enumerate(reward_names):
        metrics[f"reward/{name}"] = batch.rewards[:, j].mean().item()
        metrics[f"reward/{name}_std"] = batch.rewards[:, j].std().item() if total.numel() > 1 else 0.0
    metrics["zero_std_groups"] = (grouped.max(-1).values == grouped.min(-1).values).float().mean().item()
    # every group tied: every advantage is 0 and the policy gradient with it (only a KL term can pull)
    metrics["no_signal"] = metrics["zero_std_groups"] == 1.0
    metrics["completion_len"] = batch.lengths.float().mean().item()
    metrics["completion_len_max"] = int(batch.lengths.max())
    metrics["truncated"] = batch.truncated.float().mean().item()
    metrics["tokens"] = int(batch.lengths.sum())
    metrics["time_sample"], metrics["time_score"] = batch.times["sample"], batch.times["score"]
    return metrics
