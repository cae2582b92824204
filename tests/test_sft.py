"""sft.py: the batch layout, the token-mean loss, and that it learns the reference completions."""

import torch

import gsm8k
import lora as L
import logprobs as LP
import model as M
import sft
from conftest import adamw, make_tiny_checkpoint


def tiny(tmp_path):
    problems = gsm8k.synthetic_problems(32)
    texts = [gsm8k.prompt_text(p.question, M.Tokenizer.chat) + gsm8k.reference_completion(p) for p in problems]
    folder = make_tiny_checkpoint(tmp_path, texts, std=0.2)  # logits far from uniform: LoRA can move them
    return M.from_pretrained(folder), M.load_tokenizer(folder), problems


def test_batch_layout(tmp_path):
    _, tok, problems = tiny(tmp_path)
    ids, attn, mask = sft.sft_batch(tok, problems[:3], "cpu")
    Tc = mask.shape[1]
    for i, p in enumerate(problems[:3]):
        target = tok.encode(gsm8k.reference_completion(p)) + [tok.im_end]
        n = int(mask[i].sum())
        assert ids[i, -Tc:][:n].tolist() == target and not mask[i, n:].any()  # right-padded targets
        prompt = tok.encode(gsm8k.prompt_text(p.question, tok.chat))
        assert ids[i, :-Tc][attn[i, :-Tc].bool()].tolist() == prompt  # left-padded prompt


def test_loss_is_the_token_mean_and_it_learns(tmp_path):
    model, tok, problems = tiny(tmp_path)
    L.apply_lora(model, r=4, alpha=8)
    batch = problems[:8]
    ids, attn, mask = sft.sft_batch(tok, batch, "cpu")
    with torch.no_grad():
        logp, _ = LP.completion_logprobs(model, ids, attn, mask.shape[1])
        expected = -(logp[mask]).mean().item()
    opt = adamw(model, 3e-2)

    def step(micro_batch):
        opt.zero_grad()
        out = sft.backward(model, ids, attn, mask, micro_batch=micro_batch)
        opt.step()
        return out

    first = step(micro_batch=3)  # micro-batches sum to the batch mean
    assert abs(first["loss"] - expected) < 1e-5 and first["tokens"] == int(mask.sum())
    for _ in range(30):
        last = step(micro_batch=8)
    assert last["loss"] < 0.5 * first["loss"], (first["loss"], last["loss"])  # measured: 7.5 -> 0.33
