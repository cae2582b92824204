"""Shared fixtures: tiny random Qwen2 checkpoints in the Hugging Face layout, built locally."""

import os
import sys

import pytest
import torch

# Tiny models on a shared 2-core machine: more threads only wait on each other (train.py's tiny preset
# makes the same choice); measured, a tiny run took 8 s with 1 thread and 18 s with 2 on a loaded machine.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
GSM8K_DIR = os.path.join(SHARED, "gsm8k")
QWEN_TOKENIZER = os.path.join(SHARED, "qwen2.5-tokenizer", "tokenizer.json")

# Two tiny shapes: tied embeddings with GQA 4:2, untied with GQA 6:1 (3 layers).
TINY = {
    "tied": dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    "untied": dict(vocab_size=131, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                   num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=1e6),
}


def hf_config_dict(**kw):
    base = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rms_norm_eps=1e-6,
                max_position_embeddings=512, use_sliding_window=False, hidden_act="silu",
                torch_dtype="float32", bos_token_id=0, eos_token_id=1)
    base.update(kw)
    return base


def make_hf_model(name="tied", seed=0):
    """A transformers Qwen2ForCausalLM with random weights (biases too, so they are tested)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(**{k: v for k, v in hf_config_dict(**TINY[name]).items() if k != "model_type"})
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(params=["tied", "untied"])
def hf_pair(request, tmp_path):
    """(transformers model, folder it was saved to) for each tiny shape."""
    hf = make_hf_model(request.param)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf, str(tmp_path)


def make_tiny_checkpoint(folder, texts, layers=2, hidden=64, seed=0, std=0.02):
    """Our own tiny random Qwen2 + a BPE tokenizer trained on `texts`, saved in the HF layout."""
    import model as M
    from tiny import train_tiny_tokenizer
    tok = train_tiny_tokenizer(texts, vocab_size=400)
    cfg = M.ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=1024, rope_theta=10000.0)
    m = M.Qwen2(cfg)
    m.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    M.save_pretrained(m, str(folder))
    tok.save(os.path.join(str(folder), "tokenizer.json"))
    return str(folder)


def learn(model, batch, cfg, optimizer, scheduler=None, profiler=None, max_grad_norm=1.0) -> dict:
    """The learning half of train.py's GRPO step on a rollout (reference log-probs, then per pass:
    backward, record, clip, step), for unit tests on toy models; train.py's own loop is tested end to
    end in test_train.py."""
    import math

    import grpo
    import lora
    params = lora.lora_parameters(model)
    grpo.reference_logprobs(model, batch, cfg)
    stats = {}
    for it in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        stats |= grpo.backward(model, batch, cfg, first=it == 0)
        if it == 0 and profiler is not None:
            profiler.record()
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf))
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def grpo_step(model, tokenizer, optimizer, examples, prompts, reward_fns, weights, cfg, generator,
              scheduler=None, profiler=None) -> dict:
    """One GRPO step on a toy model: rollout, then learn (above); returns the step's metrics."""
    import grpo
    batch = grpo.rollout(model, tokenizer, prompts, examples, reward_fns, weights, cfg, generator)
    metrics = grpo.rollout_metrics(batch, list(reward_fns), cfg.num_generations)
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    return metrics | learn(model, batch, cfg, optimizer, scheduler, profiler)


def adamw(model, lr):
    """AdamW on the adapters, as train.configure_optimizers builds it."""
    import lora
    return torch.optim.AdamW(lora.lora_parameters(model), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
