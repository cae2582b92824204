"""Qwen2 / Qwen2.5 in plain PyTorch: the model, its KV cache, checkpoint loading and the tokenizer.

Read top to bottom: config, RMSNorm, rotary embeddings, attention, MLP, block, model, then the KV
cache and shared prompts, loading and the tokenizer; sampling is in generate.py, the learner's
log-probs in logprobs.py. Module and parameter names are
exactly those of Hugging Face's `Qwen2ForCausalLM` (`model.layers.15.self_attn.q_proj.weight`), so a
checkpoint loads key for key and LoRA paths read like PEFT's.

Deliberately left out: sliding-window attention and rope scaling (refused at load time), training
tricks other than optional gradient checkpointing, any kernel dispatch. Numerically sensitive parts
(RMSNorm, softmax in sampling, log-probs) run in float32 whatever the weights' dtype.

    model = from_pretrained("Qwen/Qwen2.5-1.5B-Instruct")   # or a local folder
    tok = load_tokenizer("Qwen/Qwen2.5-1.5B-Instruct")
    ids = [tok.encode(tok.chat([{"role": "user", "content": "2+2?"}]))]
    logits = model(torch.tensor(ids))  # (1, T, vocab); generate.py samples completions
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
        # x / sqrt(mean(x^2) + eps) in float32, so bf16 activations do not lose the small variances; the
        # weight multiplies after rounding back, as in HF (F.rms_norm equals the written-out formula bit
        # for bit in float32, in one call).
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and signed sin tables [B, T, head_dim] for integer positions [B, T] (HF's rotate-half layout).

    The sin table carries rotate-half's sign, [-sin, sin], so that apply_rope needs one roll instead of
    chunk + neg + cat; -x2*sin and x2*(-sin) are the same float, so the result is bit-identical to HF's.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by the tables [B, 1, T, hd]: x*cos + rotate_half(x)*sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, bias, kv: "KVCache | PromptKV | SharedPrompts | None", layer: int):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # keys/values from before: the KV cache's (B, nkv, max_len, hd), masked by bias,
            k, v = kv.write(layer, k, v)  # or shared prompts' then these (B, nkv, Tp + T, hd)
        # bias: (B, 1, T, S) additive mask, or None for plain causal attention without padding or cache
        if isinstance(kv, KVCache):
            # With a cache (prefill and decoding), the g = n_head / n_kv query heads of a KV head become g*T
            # queries of that head (same keys; bias is the mask repeated g times, hidden_states), so each
            # cached key is read once per KV head, not g times; a decode step's T is a prompt's K samples.
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.hd), k, v, attn_mask=bias)
            y = y.view(B, self.n_head, T, self.hd)
        else:  # GQA: SDPA's enable_gqa shares each KV head across n_head / n_kv query heads without a copy
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

    def forward(self, x, cos, sin, bias, kv, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias, kv, layer)
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
        x = self.hidden_states(input_ids, attention_mask, cache)
        if num_logits is not None:
            x = x[:, -num_logits:]
        return self.lm_head(self.model.norm(x))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      kv: "KVCache | PromptKV | SharedPrompts | None" = None) -> torch.Tensor:
        """The last block's output [B, T, C], before the final norm. kv: a KVCache (decoding), or for
        completion_logprobs_shared PromptKV (prompts: keep their keys and values) or SharedPrompts (the
        completions that continue them)."""
        shape = input_ids.shape
        mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(torch.bool))
        # after the prompts (a compiled step is always a decode step), one new token per sample [B*K, 1]
        per_sample = isinstance(kv, KVCache) and shape[1] == 1 and (torch.compiler.is_compiling() or kv.filled > 0)
        if per_sample:  # to the model, a row of K tokens per prompt
            input_ids, mask = input_ids.view(kv.rows, kv.samples), mask.view(kv.rows, kv.samples)
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if isinstance(kv, KVCache):  # positions and the additive mask (B, 1, T, S) come from the cache
            positions, bias = kv.append(mask, per_sample)
            cos, sin = kv.rope[positions].unbind(2)  # looked up in the table it computed once
            if T > 1:  # once for every layer: query i*T + t of a KV head (Attention) is token t's
                bias = bias.repeat(1, 1, self.config.num_attention_heads // self.config.num_key_value_heads, 1)
        else:
            if isinstance(kv, SharedPrompts):  # after the prompts: keys (B, Tp + T), positions from Tp's count
                start, key_mask = kv.continuing(mask)
            else:
                start, key_mask = 0, mask
            positions = (start + mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
            if attention_mask is None and kv is None:  # no padding: SDPA's plain causal attention, no mask tensor
                bias = None
            else:  # additive: SDPA's CPU kernel takes it faster than a boolean mask
                S = key_mask.shape[1]
                key_bias = torch.zeros(B, 1, 1, S, dtype=x.dtype, device=x.device).masked_fill_(
                    ~key_mask[:, None, None, :], float("-inf"))
                bias = causal_bias(key_bias, torch.arange(S - T, S, device=x.device))
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and not isinstance(kv, KVCache):
                x = checkpoint(block, x, cos, sin, bias, kv, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, bias, kv, i)
        return x.view(*shape, -1)


# ------------------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys/values [B, n_kv, max_len, hd] per layer for B prompts and K samples of each,
    written by slot and read whole.

    A prompt's keys are kept once, however many samples continue it. The prefill writes the prompts'
    tokens (left-padded, so every row writes the same slots); then each decode step writes one token per
    sample, sample j's in slot pos + j, and the model runs the step as one row of K tokens per prompt
    (Qwen2.hidden_states), so the K samples read their prompt's keys once per step, not K times (on the
    CPU those copies were most of a decode step's memory traffic). `bias` [B, K, max_len] is sample k's
    additive mask: 0 for its prompt's real tokens and its own, -inf for left padding, the other samples'
    tokens, a finished sample's padding and slots not written yet. `pos`, the number of slots written,
    lives on the device, and `seen` [B, K] counts each sample's real tokens, which gives its next rotary
    position. Eager code attends over the slots written so far (`filled`, the host's copy of pos); a
    compiled step attends over all max_len slots, masked by `bias`, so that every step has the same
    shapes and none reads a host number: it compiles once and can be captured as a CUDA graph.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype, samples: int = 1):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.bias = torch.full((batch, samples, max_len), float("-inf"), device=device, dtype=dtype)
        self.seen = torch.zeros(batch, samples, device=device, dtype=torch.long)
        self.pos = torch.zeros((), device=device, dtype=torch.long)
        self.arange = torch.arange(max_len, device=device)
        cos, sin = rope_cos_sin(self.arange[None], cfg.head_dim, cfg.rope_theta, dtype)
        self.rope = torch.stack([cos[0], sin[0]], dim=1)  # (max_len, 2, hd): one lookup a step for both
        self.mask_bias = torch.tensor([float("-inf"), 0.0], device=device, dtype=dtype)  # [mask] -> additive bias
        self.own = torch.eye(samples, device=device, dtype=torch.bool)  # [k, j]: sample k sees new token j
        self.rows, self.samples, self.max_len = batch, samples, max_len
        self.filled = 0  # pos on the host (eager code only: a compiled step never reads it)
        self.slots = None  # (T,) the slots of the tokens being appended

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, self.bias, self.seen, self.pos]

    def reset(self):
        """Empty, in place (a compiled step's cache is reused at the same addresses); stale keys stay
        behind a -inf mask."""
        self.bias.fill_(float("-inf"))
        self.seen.zero_()
        self.pos.zero_()
        self.filled = 0

    @property
    def used(self) -> int:
        """The slots attention reads: those written so far (eager), or all of them (compiled: static shapes)."""
        return self.max_len if torch.compiler.is_compiling() else self.filled

    def append(self, mask: torch.Tensor, per_sample: bool = False):
        """Register T new tokens of each prompt (mask [B, T]), or with per_sample one new token of each
        sample (mask [B, K]); returns their positions [B, T] and attention bias [B, 1, T, used]."""
        T = mask.shape[1]
        if not torch.compiler.is_compiling():  # a compiled step must not specialise to a host number
            if self.filled + T > self.max_len:
                raise ValueError(f"KV cache full: {self.filled} + {T} tokens > max_len {self.max_len}")
            self.filled += T
        self.slots = self.pos + self.arange[:T]  # (T,)
        m = mask.long()
        self.pos += T
        if per_sample:  # sample j's token: seen by sample j alone (if real), at sample j's next position
            positions = self.seen + 0
            self.seen += m
            new = torch.where(self.own, self.mask_bias[m][:, None, :], float("-inf"))  # (B, K, K)
            self.bias.index_copy_(2, self.slots, new)
            return positions, self.bias[:, None, :, :self.used]
        positions = self.seen[:, :1] + m.cumsum(-1) - m  # the samples share the prompt; padding gets its next
        self.seen += m.sum(-1, keepdim=True)  # real token's position
        self.bias.index_copy_(2, self.slots, self.mask_bias[m][:, None, :].expand(-1, self.samples, -1))
        return positions, causal_bias(self.bias[:, None, :1, :self.used], self.slots)

    def keep(self, prompts: torch.Tensor):
        """Keep only these prompts (indices [B']) and their samples, as new tensors (eager decoding drops
        prompts whose samples have all finished; a compiled step's cache never changes shape)."""
        for i in range(len(self.k)):  # a layer at a time: never two whole caches at once
            self.k[i], self.v[i] = self.k[i][prompts], self.v[i][prompts]
        self.bias, self.seen = self.bias[prompts], self.seen[prompts]
        self.rows = len(prompts)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values [B, n_kv, T, hd] in their slots; return the whole cache of this layer."""
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        return self.k[layer][:, :, :self.used], self.v[layer][:, :, :self.used]


class PromptKV:
    """The prompts' pass of completion_logprobs_shared: keeps each layer's keys and values [G, n_kv, Tp, hd]
    with their autograd graph (a checkpointed block's recomputation writes the same values again)."""

    def __init__(self):
        self.k, self.v = {}, {}

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer], self.v[layer] = k, v
        return k, v


class SharedPrompts:
    """Prompts that several rows continue (GRPO's K completions of a prompt), run once for all of them.

    Row i of the completions' pass attends to the keys and values PromptKV kept for prompt rows[i]
    before its own, so each prompt's forward is computed once instead of K times, and backward sums
    the K rows' gradients into that one pass. Every completion token sees exactly the keys, values and
    positions it sees in the whole sequence (tested against completion_logprobs).
    """

    def __init__(self, prompts: PromptKV, mask: torch.Tensor, rows: torch.Tensor):
        self.prompts, self.rows = prompts, rows  # rows (N,): row -> prompt
        self.mask = mask.to(torch.bool)  # (G, Tp) left-padded prompts

    def continuing(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first position [N, 1], key mask [N, Tp + T]) of new tokens (mask [N, T]) after their prompts."""
        return self.mask.sum(-1)[self.rows][:, None], torch.cat([self.mask[self.rows], mask], 1)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Each row's prompt's keys/values, then the row's own: [N, n_kv, Tp + T, hd]."""
        return (torch.cat([self.prompts.k[layer][self.rows], k], 2),
                torch.cat([self.prompts.v[layer][self.rows], v], 2))


def causal_bias(key_bias: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Additive attention mask [B, 1, T, S] for T queries at `slots` [T] over S keys.

    key_bias [B, 1, 1, S] is 0 for real keys and -inf for padding. Query i sees the real keys up to its
    own slot, and always itself, so that a padding query has no all-masked row (its output is ignored).
    """
    keys = torch.arange(key_bias.shape[-1], device=key_bias.device)[None, :]  # (1, S)
    bias = key_bias.masked_fill(keys > slots[:, None], float("-inf"))  # (B, 1, T, S)
    return bias.masked_fill(keys == slots[:, None], 0.0)


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


# ------------------------------------------------------------------------------------- batching

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
