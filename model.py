"""Qwen2 / Qwen2.5 in plain PyTorch: the model, checkpoint loading, the tokenizer and batched sampling.

Read bottom-up: config, RMSNorm, rotary embeddings, attention, MLP, block, model, then the KV cache,
loading, the tokenizer and `generate`. Module and parameter names are exactly those of Hugging Face's
`Qwen2ForCausalLM` (`model.layers.15.self_attn.q_proj.weight`), so a checkpoint loads key for key and
LoRA paths read like PEFT's.

Deliberately left out: sliding-window attention and rope scaling (refused at load time), training
tricks other than optional gradient checkpointing, any kernel dispatch. Numerically sensitive parts
(RMSNorm, softmax in sampling, log-probs) run in float32 whatever the weights' dtype.

    model = from_pretrained("Qwen/Qwen2.5-1.5B-Instruct")   # or a local folder
    tok = load_tokenizer("Qwen/Qwen2.5-1.5B-Instruct")
    ids = [tok.encode(tok.chat([{"role": "user", "content": "2+2?"}]))]
    out, mask = generate(model, ids, max_new_tokens=32, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict; refuse anything we do not implement."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or ["Qwen2ForCausalLM"]
        if model_type != "qwen2" or archs != ["Qwen2ForCausalLM"]:
            raise ValueError(f"not a Qwen2 causal LM: model_type={model_type!r}, architectures={archs!r} "
                             f"(expected 'qwen2' / ['Qwen2ForCausalLM'])")
        if hf.get("use_sliding_window"):
            raise ValueError("config asks for sliding-window attention (use_sliding_window=true), "
                             "which this implementation does not support")
        # Newer configs nest rope_theta (and the rope type) inside rope_parameters.
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"config asks for rope scaling {rope!r}, which this implementation does not support")
        hf = dict(hf)
        if "rope_theta" not in hf and "rope_theta" in rope:
            hf["rope_theta"] = rope["rope_theta"]
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
            raise ValueError(f"head_dim={head_dim} differs from hidden_size/num_attention_heads; not supported")
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in hf and n != "tie_word_embeddings")
        if missing:
            raise ValueError(f"config.json lacks {missing}")
        return cls(**{n: hf[n] for n in names if n in hf})

    def to_hf(self) -> dict:
        """The config.json a Hugging Face loader reads back."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
                "use_sliding_window": False, **d}


# ----------------------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16 activations do not lose the small variances. (Written out:
        # on the CPU these plain ops run forward + backward faster than the fused F.rms_norm.)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, T, head_dim] for integer positions [B, T] (HF's rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by the tables [B, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, bias, cache: "KVCache | None", layer: int):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, nkv, S, hd): everything cached so far
        # GQA: SDPA's enable_gqa shares each KV head across n_head / n_kv query heads without a copy.
        # bias: (B, 1, T, S) additive mask, or None for plain causal attention without padding
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, bias, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """The transformer without its head; named `model` inside Qwen2 as in the checkpoint."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random weights (tests and the tiny preset); real runs load a checkpoint instead."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: "KVCache | None" = None, num_logits: int | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, num_logits, vocab] for the last positions only).

        attention_mask [B, T] marks real tokens (1) and left padding (0) of the *new* tokens; positions
        come from it, so prompts of different lengths share one batch. With a cache the new tokens are
        appended to it and attend to everything cached before.
        """
        B, T = input_ids.shape
        mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(torch.bool))
        if cache is None:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            valid = mask
            past = 0
        else:
            positions, valid = cache.append_mask(mask)  # valid: (B, S) over all cached positions
            past = cache.pos - T
        if attention_mask is None and cache is None:  # no padding: plain causal attention, no mask tensor
            allowed = None
        elif T == 1 and cache is not None:  # a decode step: the newest token sees every real cached token
            allowed = valid[:, None, None, :]  # (B, 1, 1, S)
        else:
            # allowed[b, 0, i, j]: query i (absolute past+i) may see key j. Causal, not padding, and always
            # itself, so a padding query never has an all-masked row (its output is ignored anyway).
            S = valid.shape[1]
            q_idx = torch.arange(past, past + T, device=input_ids.device)[:, None]
            k_idx = torch.arange(S, device=input_ids.device)[None, :]
            allowed = (k_idx <= q_idx)[None] & valid[:, None, :]
            allowed = (allowed | (k_idx == q_idx)[None])[:, None]  # (B, 1, T, S)

        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        bias = None  # additive form of `allowed`: SDPA's CPU kernel takes it faster than a boolean mask
        if allowed is not None:
            bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
        if cache is None:
            cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        else:  # looked up in the table the cache computed once
            cos, sin = cache.cos[positions], cache.sin[positions]
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, bias, None, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, bias, cache, i)
        if num_logits is not None:
            x = x[:, -num_logits:]
        return self.lm_head(self.model.norm(x))


# ------------------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys/values [B, n_kv, max_len, hd] per layer, written by position.

    `pos` is the number of positions written (the same for every row: prompts are left-padded);
    `valid` [B, max_len] marks which of them are real tokens and `seen` [B] counts them, which gives
    the next rotary position of each row.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.seen = torch.zeros(batch, device=device, dtype=torch.long)
        positions = torch.arange(max_len, device=device)[None]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)
        self.cos, self.sin = cos[0], sin[0]  # (max_len, hd)
        self.max_len = max_len
        self.pos = 0

    def append_mask(self, mask: torch.Tensor):
        """Register T new tokens; returns their positions [B, T] and the validity of all keys [B, pos]."""
        T = mask.shape[1]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > max_len {self.max_len}")
        positions = self.seen[:, None] + mask.long().cumsum(-1) - 1
        self.valid[:, self.pos:self.pos + T] = mask
        self.seen += mask.long().sum(-1)
        self.pos += T
        return positions.clamp(min=0), self.valid[:, :self.pos]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values at their positions; return all keys/values so far."""
        T = k.shape[2]
        start = self.pos - T
        self.k[layer][:, :, start:self.pos] = k
        self.v[layer][:, :, start:self.pos] = v
        return self.k[layer][:, :, :self.pos], self.v[layer][:, :, :self.pos]

    def repeat_rows(self, n: int) -> "KVCache":
        """Each row repeated n times in place (row i -> rows i*n .. i*n+n-1): prefill once, sample n."""
        self.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        self.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        self.valid = self.valid.repeat_interleave(n, dim=0)
        self.seen = self.seen.repeat_interleave(n, dim=0)
        return self


# ------------------------------------------------------------------------------------- log-probs

def completion_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, n_completion: int, entropy: bool = False):
    """fp32 log-probs [N, Tc] of the last Tc tokens of ids [N, T] (and the policy's entropy there)."""
    logits = model(ids, attn, num_logits=n_completion + 1)[:, :-1].float()  # (N, Tc, V) predicts the tail
    targets = ids[:, -n_completion:]
    logp = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    if not entropy:
        return logp, None
    with torch.no_grad():
        lp = logits.log_softmax(-1)
        ent = -(lp.exp() * lp).sum(-1)
    return logp, ent


# -------------------------------------------------------------------------------------- loading

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "*.safetensors", "model.safetensors.index.json"]


def resolve(name_or_path: str) -> str:
    """A local folder as is; otherwise a Hub repo id, downloaded (config, tokenizer, safetensors only)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_path}: not a model folder")
    from huggingface_hub import snapshot_download
    return snapshot_download(name_or_path, allow_patterns=HUB_FILES)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the study's setting), fp32 on the CPU (exact tests, no slow bf16 kernels)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (is {folder} a Hugging Face model folder?)")
    with open(path) as f:
        return ModelConfig.from_hf(json.load(f))


def from_pretrained(name_or_path: str, device=None, dtype=None) -> Qwen2:
    """Load a Qwen2 checkpoint (Hub id or folder; single or sharded safetensors), strictly by name."""
    from safetensors import safe_open

    folder = resolve(name_or_path)
    cfg = read_config(folder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")

    with torch.device("meta"):  # no memory until each tensor arrives from the file
        model = Qwen2(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = {}
    for fname in files:
        with safe_open(os.path.join(folder, fname), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in expected:
                    raise ValueError(f"{fname}: unexpected tensor {key!r} (not a Qwen2 parameter)")
                t = f.get_tensor(key)
                if t.shape != expected[key]:
                    raise ValueError(f"{fname}: tensor {key!r} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(expected[key])}")
                state[key] = t.to(device=device, dtype=dtype)
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    missing = sorted(k for k in expected if state.get(k) is None)
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced both parameters; tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def save_pretrained(model: Qwen2, folder: str):
    """config.json + model.safetensors in the Hugging Face layout (tied lm_head stored once)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    tmp = os.path.join(folder, "model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f, indent=2)


# ------------------------------------------------------------------------------------ tokenizer

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class Tokenizer:
    """The checkpoint's tokenizer.json plus the Qwen2.5-Instruct chat format, in plain Python."""

    def __init__(self, tok):
        self.tok = tok
        ids = {s: tok.token_to_id(s) for s in SPECIALS}
        if None in ids.values():
            raise ValueError(f"tokenizer lacks special token(s) {[s for s, i in ids.items() if i is None]}")
        self.im_end, self.endoftext = ids["<|im_end|>"], ids["<|endoftext|>"]
        self.stop_ids = [self.im_end, self.endoftext]
        self.pad_id = self.endoftext  # as Qwen2.5's tokenizer_config: padding never reaches the model

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @staticmethod
    def chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Qwen2.5-Instruct's chat template: a default system turn unless one is given."""
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(messages)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """Tokenizer from a folder (or Hub repo id) holding tokenizer.json, or from the file itself."""
    from tokenizers import Tokenizer as HFTokenizer
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(resolve(name_or_path), "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing tokenizer.json")
    return Tokenizer(HFTokenizer.from_file(path))


# ------------------------------------------------------------------------------------- sampling

def left_pad(seqs: list[list[int]], pad_id: int, device=None):
    """Token lists -> (ids [B, T], mask [B, T]) padded on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None, noise_rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One token per row from logits [N, V]; greedy at temperature 0.

    noise_rows = (offset, total): these N rows are rows offset.. of a batch of `total` sampled with the
    same generator (data parallelism): the noise of the whole batch is drawn and this slice used, so
    every row gets the noise it would get in a single process.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    # argmax(p / E) with E ~ Exp(1) draws from p without a host sync (unlike torch.multinomial);
    # E = -log U, since on the CPU torch.rand is several times faster than Tensor.exponential_.
    offset, total = noise_rows or (0, probs.shape[0])
    noise = torch.rand((total, probs.shape[1]), generator=generator, device=probs.device)
    noise = noise[offset:offset + probs.shape[0]].log_().neg_()
    return (probs / noise).argmax(-1)


def generate(model: Qwen2, prompts: list[list[int]], max_new_tokens: int, stop_ids, pad_id: int,
             num_samples: int = 1, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             stop_check_every: int | None = None, noise_rows: tuple[int, int] | None = None):
    """Sample `num_samples` completions of each prompt with a KV cache.

    Returns (tokens [B*n, T_new], mask [B*n, T_new]): row i*n+j is sample j of prompt i; the mask is 1
    up to and including the first stop token, 0 after it (those positions hold pad_id).
    """
    # inference_mode skips autograd's bookkeeping on every op; its tensors cannot enter a backward
    # later (GRPO trains on these tokens), so the results are cloned outside it.
    with torch.inference_mode():
        out, mask = _generate(model, prompts, max_new_tokens, stop_ids, pad_id, num_samples, temperature, top_k,
                              top_p, generator, stop_check_every, noise_rows)
    return out.clone(), mask.clone()


def _generate(model, prompts, max_new_tokens, stop_ids, pad_id, num_samples, temperature, top_k, top_p, generator,
              stop_check_every, noise_rows):
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids, mask = left_pad(prompts, pad_id, device)
    B, T0 = ids.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if T0 + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt of {T0} tokens + {max_new_tokens} new tokens exceeds the context "
                         f"({model.config.max_position_embeddings})")
    cache = KVCache(model.config, B, T0 + max_new_tokens, device, dtype)
    logits = model(ids, mask, cache=cache, num_logits=1)[:, -1]  # prefill each prompt once: (B, V)
    if num_samples > 1:
        cache.repeat_rows(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
    N = B * num_samples
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    # Checking "all rows finished" syncs with the host; on a GPU do it only every few tokens.
    every = stop_check_every or (16 if device.type == "cuda" else 1)
    for t in range(max_new_tokens):
        real = ~done  # rows still writing; finished rows get padding the model will not attend to
        tok = torch.where(real, sample_next(logits, temperature, top_k, top_p, generator, noise_rows), pad_id)
        out[:, t] = tok
        done = done | torch.isin(tok, stops)
        if t + 1 == max_new_tokens or ((t + 1) % every == 0 and bool(done.all())):
            break
        logits = model(tok[:, None], real[:, None].long(), cache=cache)[:, -1]
    out = out[:, :t + 1]
    # mask: real tokens up to and including the first stop
    is_stop = torch.isin(out, stops)
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    return out, (~after_stop).long()
