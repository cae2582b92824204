"""logprobs.py: the learner's log-probs against transformers, against the plain computation, and on
shared prompts against the whole sequences."""

import os

import pytest
import torch

import logprobs as LP
import model as M

TOL = 1e-4


def shared_batch(vocab, seed=4):
    """3 left-padded prompts, 4 completions of each (some stopped early), and the same as whole sequences."""
    g = torch.Generator().manual_seed(seed)
    prompts, ids = torch.randint(0, vocab, (3, 7), generator=g), torch.randint(0, vocab, (12, 5), generator=g)
    prompt_mask, mask = torch.ones_like(prompts), torch.ones_like(ids)
    prompt_mask[0, :3], prompt_mask[1, :1], mask[2, 3:], mask[5, 1:] = 0, 0, 0, 0
    rows = torch.arange(12) // 4
    return prompts, prompt_mask, rows, ids, mask, torch.cat([prompts[rows], ids], 1), torch.cat([prompt_mask[rows], mask], 1)


def test_shared_prompt_logprobs_match_transformers(hf_pair):
    """Completions continuing prompts run once each (SharedPrompts) get the log-probs transformers gives
    the whole left-padded sequences."""
    hf, folder = hf_pair
    ours = M.from_pretrained(folder)
    prompts, prompt_mask, rows, ids, mask, full, full_mask = shared_batch(hf.config.vocab_size)
    with torch.no_grad():
        logp, _ = LP.completion_logprobs_shared(ours, prompts, prompt_mask, rows, ids, mask)
        logits = hf(full, attention_mask=full_mask).logits[:, -6:-1].float()
    want = torch.gather(logits.log_softmax(-1), 2, ids[..., None])[..., 0]
    assert ((logp - want).abs() * mask).max() <= TOL


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompts_give_the_whole_sequences_values_and_gradients(checkpointing):
    """Against completion_logprobs on the whole sequences, with LoRA and different ranks, with and without
    gradient checkpointing: log-probs and entropies within rounding (fp32: a few ulp), adapter gradients
    to 1e-5 of their size (the K rows' gradients are summed in another order)."""
    import lora as L
    cfg = M.ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = M.Qwen2(cfg)
    m.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    m.requires_grad_(False)
    L.apply_lora(m, r=4, alpha=8.0, rank_pattern={"model.layers.1.mlp.*": 2})
    with torch.no_grad():
        for p in L.lora_parameters(m):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    m.gradient_checkpointing = checkpointing
    m.train()
    prompts, prompt_mask, rows, ids, mask, full, full_mask = shared_batch(100)
    weight = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2)) * mask
    got = []
    for fn in (lambda: LP.completion_logprobs(m, full, full_mask, 5, entropy=True),
               lambda: LP.completion_logprobs_shared(m, prompts, prompt_mask, rows, ids, mask, entropy=True)):
        logp, ent = fn()
        (logp * weight).sum().backward()
        got.append((logp.detach(), ent, [p.grad.clone() for p in L.lora_parameters(m)]))
        m.zero_grad(set_to_none=True)
    (a, ea, ga), (b, eb, gb) = got
    real = mask.bool()
    assert torch.allclose(a[real], b[real], rtol=0, atol=2e-6) and torch.allclose(ea[real], eb[real], rtol=0, atol=2e-6)
    assert all((x - y).abs().max() <= 1e-5 * x.abs().max() for x, y in zip(ga, gb))
    assert all(x.abs().max() > 0 for x in ga)  # every adapter got a gradient: the comparison means something


def plain_logprobs(logits, targets, temperature):
    """The unchunked computation TokenLogProbs replaces: one fp32 copy of every logit, then cross_entropy."""
    x = logits[:, :-1].float() / temperature
    logp = -torch.nn.functional.cross_entropy(x.flatten(0, 1), targets.flatten(), reduction="none")
    lp = x.detach().log_softmax(-1)
    return logp.view_as(targets), -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_are_the_plain_ones_bit_for_bit(monkeypatch, dtype):
    """Values, entropy and gradients equal the unchunked computation exactly, in fp32 and from bf16
    logits, with chunks of 3 positions (so chunks split sequences) and at temperature 0.7."""
    from trl.trainer.utils import selective_log_softmax
    torch.manual_seed(0)
    logits = (torch.randn(3, 18, 500) * 3).to(dtype)
    targets, g = torch.randint(0, 500, (3, 17)), torch.randn(3, 17)
    monkeypatch.setattr(LP, "LOGIT_CHUNK_BYTES", 3 * 4 * 500)

    class Head(torch.nn.Module):  # a "model" whose logits are the fixed tensor above
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(logits.clone())

        def forward(self, ids, attn, num_logits):
            return self.logits[:, -num_logits:]

    ids = torch.cat([torch.zeros(3, 5, dtype=torch.long), targets], 1)
    head, ref = Head(), logits.clone().requires_grad_()
    logp, ent = LP.completion_logprobs(head, ids, None, 17, entropy=True, temperature=0.7)
    want_logp, want_ent = plain_logprobs(ref, targets, 0.7)
    (logp * g).sum().backward()
    (want_logp * g).sum().backward()
    assert logp.dtype == torch.float32 and head.logits.grad.dtype == dtype
    assert torch.equal(logp, want_logp) and torch.equal(ent, want_ent) and torch.equal(head.logits.grad, ref.grad)
    # TRL's selective_log_softmax, an independent implementation of the same quantity
    trl = selective_log_softmax(logits[:, :-1].float() / 0.7, targets)
    assert torch.allclose(logp, trl, atol=0, rtol=1e-6)


MEASURE = """
import sys, torch, logprobs as LP
def hwm():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
logits = torch.randn(4, 257, 32000, requires_grad=True)  # 132 MB in fp32
targets = torch.randint(0, 32000, (4, 256))
before = hwm()
open('/proc/self/clear_refs', 'w').write('5')
if sys.argv[1] == 'plain':
    x = logits[:, :-1].float()
    logp = -torch.nn.functional.cross_entropy(x.flatten(0, 1), targets.flatten(), reduction='none')
    with torch.no_grad():
        lp = x.log_softmax(-1); ent = -(lp.exp() * lp).sum(-1)
else:
    logp, ent = LP.completion_logprobs(lambda ids, attn, num_logits: logits, targets, None, 256, entropy=True)
logp.sum().backward()
print(hwm() * 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-memory reset")
def test_chunked_logprobs_use_less_memory():
    """Peak resident memory of log-probs + entropy + backward on 4 x 256 x 32,000 logits (132 MB each
    in fp32): the plain computation holds several such tensors at once, the chunked one the logits, their
    gradient and a few 16 MiB chunks."""
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    peak = {w: int(subprocess.run([sys.executable, "-c", MEASURE, w], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=120, check=True).stdout) for w in ("plain", "chunked")}
    tensor = 4 * 256 * 32000 * 4
    assert peak["plain"] - peak["chunked"] > 2 * tensor, {k: v / 2**20 for k, v in peak.items()}
