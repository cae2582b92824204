"""The offline preset: a tiny Qwen2 that can be watched learning on a CPU, with nothing downloaded.

`python train.py --preset tiny` builds (once per run folder) a 4-layer, 64-wide Qwen2 with a small
byte-level BPE tokenizer trained on synthetic GSM8K-format problems (gsm8k.synthetic_problems), warms
it up with a few steps of supervised fine-tuning so that it sometimes answers in the format, and saves
it in the Hugging Face layout, so the real loading path (model.from_pretrained) is what runs.

Left out: meaning. Its numbers prove the pipeline runs; they say nothing about the study.
"""

from __future__ import annotations

import os
import random

import torch

import gsm8k
import logprobs
import model as qwen
import sft

TINY_VOCAB = 400  # the BPE's size bound (it may learn fewer tokens)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0)


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 600):
    """A small byte-level BPE with Qwen's special tokens, trained on `texts` (tests, tiny preset)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=qwen.SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def build_tiny_model(folder: str, seed: int = 0, warmup_steps: int = 40) -> str:
    """A tiny Qwen2 in the HF layout: BPE tokenizer trained on synthetic problems, random weights, then
    `warmup_steps` of full SFT on those problems, so that it sometimes answers in format and GRPO's
    rewards vary (a random model never would, and every advantage would be zero)."""
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    problems = gsm8k.synthetic_problems(200, seed=1234)
    chat = qwen.Tokenizer.chat
    texts = [gsm8k.prompt_text(p.question, chat) + gsm8k.reference_completion(p) for p in problems]
    tok = qwen.Tokenizer(train_tiny_tokenizer(texts, vocab_size=TINY_VOCAB))
    m = qwen.Qwen2(qwen.ModelConfig(vocab_size=tok.tok.get_vocab_size(), **TINY_SHAPE))
    m.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    rng = random.Random(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float summation order whatever the machine: the same model
    for _ in range(warmup_steps):  # full-parameter SFT, in this process alone (no data parallelism)
        ids, attn, mask = sft.sft_batch(tok, rng.sample(problems, 16), "cpu")
        logp, _ = logprobs.completion_logprobs(m, ids, attn, mask.shape[1])
        (-torch.where(mask, logp, 0.0).sum() / mask.sum()).backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    m.eval()
    tmp = folder + ".tmp"
    qwen.save_pretrained(m, tmp)
    tok.tok.save(os.path.join(tmp, "tokenizer.json"))
    os.replace(tmp, folder)
    return folder


def datasets() -> tuple[list, list]:
    """(train, test) synthetic problems, disjoint seeds."""
    return gsm8k.synthetic_problems(200, seed=1234), gsm8k.synthetic_problems(64, seed=4321)
