"""Per-module-rank LoRA (Hu et al., arXiv 2106.09685) for any nn.Linear, addressed by module path.

Every allocation strategy of the study is a map {module path: rank}; this file turns such a map into
adapters, checks it so a key can never silently select nothing (the study lost 2.3M parameters to
PEFT's regex keys), counts it exactly, and saves/loads it in PEFT's on-disk format.

Pattern keys are module paths with shell-style wildcards (`*`, `?`, `[...]`) matched against the whole
path with `fnmatch.fnmatchcase`: `model.layers.15.*.q_proj` is layer 15's q_proj and nothing else, since
`.` is literal. When several keys match a module, the most specific one wins: the key with the most
literal (non-wildcard) characters, so an exact path beats any pattern. Two equally specific keys that
match the same module with different values are an error, and so is a key that matches no targeted
module (the error names the nearest real paths; PEFT silently falls back to the default rank).

The LoRA scale s multiplies B·A. With ranks that differ across modules, three policies exist, chosen
by one `scale_policy` argument (not a `use_rslora` switch that could contradict it):
  fixed     s = alpha / r     one alpha for every module: PEFT's default, and what its rank_pattern gives
                              without an alpha_pattern. A module with more rank also takes smaller
                              steps, so "more capacity" and "smaller steps" are confounded
  constant  s = alpha / r0    the same s for every module (alpha_i = s·r_i), r0 the default rank
  rslora    s = alpha / √r    rank-stabilised LoRA (Kalajdzievski, arXiv 2312.03732), PEFT's use_rslora=True
At initialisation ‖∇B‖ grows like s·√r: r^-0.5 under fixed (more rank, smaller gradient), r^+0.5 under
constant, flat under rslora (tested), so the policy alone sets the sign of a raw correlation between
rank and gradient; the profiler also reports gradients divided by s·√r for that reason. The default is
`fixed`, because it is what the study's PEFT set-up does unless told otherwise. Saved adapters carry
the policy as PEFT understands it (`use_rslora`, or per-module alpha_pattern entries for `constant`),
and their rank_pattern and alpha_pattern keys are escaped full paths, which PEFT's regex rule matches
to exactly one module.

Not implemented: bias training, DoRA, fan-in-fan-out weights, several adapters at once.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from rundir import atomic_json, atomic_write

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALE_POLICIES = ("fixed", "constant", "rslora")


class DownProjection(torch.autograd.Function):
    """a = x·Aᵀ in A's precision (fp32) from an input of lower precision (bf16), keeping for backward
    the input as it is, not its fp32 copy. Autograd on `F.linear(x.float(), A)` would keep one fp32
    copy of the input per adapted module (q, k and v each their own: most of a step's activation
    memory at the real shape); here q, k and v share the bf16 input the model holds anyway."""

    @staticmethod
    def forward(ctx, x, A):
        ctx.save_for_backward(x, A)
        return F.linear(x.to(A.dtype), A)

    @staticmethod
    def backward(ctx, grad):  # grad: (..., r) in A's precision
        x, A = ctx.saved_tensors
        grad_x = (grad @ A).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_A = grad.flatten(0, -2).T @ x.flatten(0, -2).to(A.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_A


class FoldedLoRA(torch.autograd.Function):
    """y = x·(W + s·B·A)ᵀ + b for an fp32 base: the adapter folded into the weight, one large product
    where the unfolded form takes three small ones and two passes over the output (on one organism
    rollout's learn step, 15% less time; the same values to fp32 rounding). Backward recomputes the folded weight
    (out·in·r multiply-adds) rather than keep one per module, and takes A's and B's gradients from the
    r-wide products, as the unfolded form would. Only where W has the adapter's precision: folded into
    a bf16 weight, most of a small s·B·A would round away (BENCH.md)."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, scale):
        ctx.save_for_backward(x, W, A, B)
        ctx.scale = scale
        return F.linear(x, torch.addmm(W, B, A, alpha=scale), bias)

    @staticmethod
    def backward(ctx, grad):  # grad: (..., out)
        x, W, A, B = ctx.saved_tensors
        g, x2 = grad.flatten(0, -2), x.flatten(0, -2)  # (n, out), (n, in)
        grad_x = (g @ torch.addmm(W, B, A, alpha=ctx.scale)).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_A = ((g @ B).T @ x2).mul_(ctx.scale) if ctx.needs_input_grad[3] else None  # (r, in)
        grad_B = (g.T @ (x2 @ A.T)).mul_(ctx.scale) if ctx.needs_input_grad[4] else None  # (out, r)
        return grad_x, None, None, grad_A, grad_B, None


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus scale · B(A(dropout(x))); names as PEFT's (base_layer, lora_A, lora_B).

    A and B may be allocated with more rows/columns (`capacity`) than the active rank r: only the
    first r are used, so dynamic allocation can move rank without changing tensor shapes (and so
    without rebuilding the optimiser). With capacity = r, the usual case, nothing is unused.
    """

    def __init__(self, base_layer: nn.Linear, r: int, scale: float, dropout: float = 0.0, capacity: int | None = None):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base_layer = base_layer
        self.r, self.scale = r, scale
        cap = max(r, capacity or r)
        device = base_layer.weight.device
        # Adapter weights stay fp32 even on a bf16 base: they are what is trained.
        self.lora_A = nn.Linear(base_layer.in_features, cap, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(cap, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()
        self.disabled = False
        self._unmerged_weight = None  # the original base weight while merged

    def reset_parameters(self):
        """PEFT's init: A Kaiming-uniform (a=√5, i.e. nn.Linear's default), B zero, so B·A starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def get_extra_state(self) -> dict:
        """The active rank and scale travel with the weights (state_dict, checkpoints): a dynamic run's
        moved ranks come back with load_state_dict, nothing to restore by hand."""
        return {"r": self.r, "scale": self.scale}

    def set_extra_state(self, state: dict):
        r = int(state["r"])
        if not 1 <= r <= self.capacity:
            raise ValueError(f"saved rank {r} outside [1, capacity {self.capacity}]")
        self.r, self.scale = r, float(state["scale"])

    @property
    def capacity(self) -> int:
        return self.lora_A.weight.shape[0]

    # The whole weight, not a slice of all of it, when every row is active (the usual case): autograd's
    # backward of a slice allocates a zero tensor of the weight's size and copies the gradient into it.
    @property
    def A(self) -> torch.Tensor:
        w = self.lora_A.weight
        return w if self.r == w.shape[0] else w[:self.r]  # (r, in): the active rows

    @property
    def B(self) -> torch.Tensor:
        w = self.lora_B.weight
        return w if self.r == w.shape[1] else w[:, :self.r]  # (out, r)

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        W, no_dropout = self.base_layer.weight, isinstance(self.dropout, nn.Identity)
        frozen = not W.requires_grad and (self.base_layer.bias is None or not self.base_layer.bias.requires_grad)
        if no_dropout and x.dtype == W.dtype == self.A.dtype and frozen:  # fp32 (the CPU)
            return FoldedLoRA.apply(x, W, self.base_layer.bias, self.A, self.B, self.scale)
        y = self.base_layer(x)
        if x.dtype != self.A.dtype and no_dropout:
            a = DownProjection.apply(x, self.A)  # a bf16 input: no fp32 copy of it kept for backward
        else:
            a = F.linear(self.dropout(x.to(self.A.dtype)), self.A)
        return y + (F.linear(a, self.B) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold B·A into the base weight; a copy of the original is kept so unmerge restores it bit for bit.

        In place, so the weight keeps its address: a decode step captured as a CUDA graph reads it there.
        """
        if self.merged:
            return
        w = self.base_layer.weight
        self._unmerged_weight = w.detach().clone()
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_layer.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None

    @torch.no_grad()
    def set_rank(self, r: int, scale: float, generator: torch.Generator | None = None):
        """Move to rank r (<= capacity) with scale `scale`, keeping what the adapter has learned and its balance.

        The product s·B·A is re-factored by its SVD U·S·Vh (taken through QR factors of B and Aᵀ, so it
        costs O((in + out)·r²), not a full out x in SVD). A's kept rows are the top right-singular
        directions at A's initial row scale (Kaiming-uniform rows have norm 1/√3 whatever the width) and
        B absorbs the rest, U·S·√3: so ‖∇B‖ (which scales with A) and ‖∇A‖ (with s·B) keep their
        magnitudes through a move, and the next importance estimate is not moved by the move itself. An
        even split of S between A and B would shrink A's rows (‖∇B‖ falls ~3x on a 1536-wide adapter)
        and leave an adapter whose B is zero with A = 0 too, dead forever. Growing (or keeping the rank)
        reproduces the product exactly, the new directions starting as fresh LoRA directions (a
        Kaiming-uniform A row, a zero B column); shrinking keeps the r largest singular directions.
        Unused rows/columns are zeroed.
        """
        if not 1 <= r <= self.capacity:
            raise ValueError(f"rank {r} outside [1, capacity {self.capacity}]")
        QB, RB = torch.linalg.qr(self.B)  # (out, r0), (r0, r0)
        QA, RA = torch.linalg.qr(self.A.T)  # (in, r0), (r0, r0)
        U, S, Vh = torch.linalg.svd((self.scale / scale) * RB @ RA.T)  # s·B·A / s' = QB·U·S·Vh·QAᵀ
        k = min(r, self.r)  # the product has rank <= the old r
        c = A_ROW_NORM
        A, B = self.lora_A.weight, self.lora_B.weight
        new_B = (QB @ U[:, :k]) * (S[:k] / c)  # (out, k)
        new_A = c * (Vh[:k] @ QA.T)  # (k, in): orthogonal rows of norm c
        B.zero_()
        B[:, :k] = new_B
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        A[:k] = new_A
        A[r:] = 0
        self.r, self.scale = r, scale


# The row norm of a Kaiming-uniform(a=√5) A: entries U(-1/√in, 1/√in) have variance 1/(3·in).
A_ROW_NORM = 1 / math.sqrt(3)


# --------------------------------------------------------------------------------------- patterns

def target_paths(model: nn.Module, targets=TARGETS) -> list[str]:
    """Paths of every nn.Linear whose last name is one of `targets`, in module order."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, LoRALinear)) and n.rsplit(".", 1)[-1] in targets
            and not n.endswith(("lora_A", "lora_B", "base_layer"))]


def _specificity(key: str) -> int:
    return len(re.sub(r"\[[^\]]*\]|[*?]", "", key))


def nearest_paths(key: str, paths: list[str], n: int = 3) -> list[str]:
    """Real paths nearest to a key by structure: the same module name first, then the nearest layer
    number, then the most similar text (`model.layers.9.*.q_proj` on a 4-layer model -> layer 3's q_proj)."""
    name, layer = key.rsplit(".", 1)[-1], re.match(r"model\.layers\.(\d+)\.", key)

    def distance(p):
        same_name = p.rsplit(".", 1)[-1] == name or fnmatch.fnmatchcase(p.rsplit(".", 1)[-1], name)
        gap = abs(layer_of(p) - int(layer.group(1))) if layer and layer_of(p) >= 0 else 0
        return (not same_name, gap, -difflib.SequenceMatcher(None, key, p).ratio())

    return sorted(paths, key=distance)[:n]


def resolve_pattern(pattern: dict | None, paths: list[str], what: str = "rank_pattern") -> dict:
    """{path: value} for the paths that some key matches (most specific key wins); validates every key."""
    if not pattern:
        return {}
    for key in pattern:
        if not any(fnmatch.fnmatchcase(p, key) for p in paths):
            raise ValueError(f"{what} key {key!r} matches no targeted module; nearest real paths: "
                             f"{nearest_paths(key, paths)}")
    out = {}
    for p in paths:
        hits = [k for k in pattern if fnmatch.fnmatchcase(p, k)]
        if not hits:
            continue
        best = max(_specificity(k) for k in hits)
        top = [k for k in hits if _specificity(k) == best]
        if len({pattern[k] for k in top}) > 1:
            raise ValueError(f"{what} keys {top} match {p} equally specifically but give different values "
                             f"{[pattern[k] for k in top]}; make one of them more specific")
        out[p] = pattern[top[0]]
    return out


# ------------------------------------------------------------------------------------ application

def lora_scale(policy: str, alpha: float, r: int, r0: int) -> float:
    """The multiplier of B·A for a module of rank r (default rank r0) under a scale policy."""
    if policy == "fixed":
        return alpha / r
    if policy == "constant":
        return alpha / r0
    if policy == "rslora":
        return alpha / math.sqrt(r)
    raise ValueError(f"scale_policy {policy!r} unknown; allowed: {SCALE_POLICIES}")


def apply_lora(model: nn.Module, r: int = 32, alpha: float = 64.0, targets=TARGETS, rank_pattern=None,
               alpha_pattern=None, dropout: float = 0.0, scale_policy: str = "fixed",
               capacity: int | None = None) -> dict[str, int]:
    """Wrap every targeted Linear in LoRALinear with its rank; freeze everything else.

    Returns the final {module path: rank} map, rank 0 included (those modules stay plain Linear).
    `capacity` allocates every adapter with room for that rank (dynamic allocation).
    """
    if scale_policy not in SCALE_POLICIES:
        raise ValueError(f"scale_policy {scale_policy!r} unknown; allowed: {SCALE_POLICIES}")
    paths = target_paths(model, targets)
    if not paths:
        raise ValueError(f"no nn.Linear named any of {list(targets)} in the model")
    if any(isinstance(model.get_submodule(p), LoRALinear) for p in paths):
        raise ValueError("the model already has LoRA adapters")
    ranks = {p: r for p in paths} | resolve_pattern(rank_pattern, paths, "rank_pattern")
    alphas = {p: alpha for p in paths} | resolve_pattern(alpha_pattern, paths, "alpha_pattern")
    for p, rank in ranks.items():
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank for {p} must be a non-negative int, got {rank!r}")
        base = model.get_submodule(p)
        if rank > (width := min(base.in_features, base.out_features)):
            raise ValueError(f"rank {rank} for {p} exceeds its smaller dimension {width} ({base.in_features} -> "
                             f"{base.out_features}): B·A cannot have rank above {width}")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in paths:
        if ranks[p] == 0:
            continue
        parent, name = p.rsplit(".", 1)
        base = model.get_submodule(p)
        wrapped = LoRALinear(base, ranks[p], lora_scale(scale_policy, alphas[p], ranks[p], r), dropout, capacity)
        setattr(model.get_submodule(parent), name, wrapped)
    return ranks


def layer_of(path: str) -> int:
    """The layer index in a path like model.layers.15.self_attn.q_proj (-1 outside the layers)."""
    return int(path.split(".")[2]) if path.startswith("model.layers.") else -1


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict:
    """The trainable part of the model's state_dict: every A, B and each adapter's (r, scale)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k or k.endswith("._extra_state")}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters (every A and B), for the optimizer."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def count_lora_params(model: nn.Module) -> dict:
    """Total, per-layer and per-module-type LoRA parameter counts."""
    total, per_layer, per_type = 0, {}, {}
    for name, m in lora_modules(model).items():
        n = m.r * (m.base_layer.in_features + m.base_layer.out_features)
        total += n
        layer = layer_of(name)
        per_layer[layer] = per_layer.get(layer, 0) + n
        kind = name.rsplit(".", 1)[-1]
        per_type[kind] = per_type.get(kind, 0) + n
    return {"total": total, "per_layer": per_layer, "per_type": per_type}


def rank_table(ranks: dict[str, int]) -> str:
    """A layer x module table of ranks, one line per layer."""
    rows = {}
    for path, r in ranks.items():
        parts = path.split(".")
        layer = parts[2] if path.startswith("model.layers.") else "-"
        rows.setdefault(layer, {})[parts[-1]] = r
    kinds = [k for k in TARGETS if any(k in row for row in rows.values())]
    lines = ["layer " + " ".join(f"{k[:-5]:>5}" for k in kinds)]
    for layer, row in rows.items():
        lines.append(f"{layer:>5} " + " ".join(f"{row.get(k, '-'):>5}" for k in kinds))
    return "\n".join(lines)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """The frozen base model (GRPO's reference policy) without a second copy of the weights."""
    mods = list(lora_modules(model).values())
    if any(m.merged for m in mods):
        raise RuntimeError("cannot disable adapters while they are merged; call unmerge(model) first")
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m in mods:
            m.disabled = False


def merge(model: nn.Module):
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model: nn.Module):
    for m in lora_modules(model).values():
        m.unmerge()


@contextlib.contextmanager
def merged(model: nn.Module):
    """Adapters folded into the weights for the duration (fast sampling); exact restore afterwards."""
    merge(model)
    try:
        yield model
    finally:
        unmerge(model)


# ------------------------------------------------------------------------------ PEFT file format

PEFT_PREFIX = "base_model.model."


def peft_config(model: nn.Module, *, r: int, alpha: float, scale_policy: str,
                base_model_name_or_path: str = "") -> dict:
    """PEFT's adapter_config.json for this model's adapters, with `r` and `alpha` as its defaults.

    rank_pattern/alpha_pattern keys are escaped exact paths: PEFT matches them as regexes with
    `re.match(rf"(.*\\.)?({key})$", name)`, under which an escaped full path selects exactly one module.
    PEFT stores alpha, not scale, so the scale policy is exported as per-module alphas. A targeted
    Linear left without an adapter (rank 0) is listed in exclude_modules.
    """
    mods = lora_modules(model)
    rank_pattern = {re.escape(p): m.r for p, m in mods.items() if m.r != r}
    use_rslora = scale_policy == "rslora"
    # alpha such that PEFT's own formula (alpha/r or alpha/sqrt(r)) gives back our scale
    alpha_of = {p: m.scale * (math.sqrt(m.r) if use_rslora else m.r) for p, m in mods.items()}
    alpha_pattern = {re.escape(p): a for p, a in alpha_of.items() if not math.isclose(a, alpha, rel_tol=1e-12)}
    targets = sorted({p.rsplit(".", 1)[-1] for p in mods})
    excluded = [p for p in target_paths(model, targets) if p not in mods]
    dropout = {m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for m in mods.values()}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "target_modules": targets,
        "exclude_modules": excluded or None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora, "lora_dropout": max(dropout, default=0.0), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }


def save_adapter(model: nn.Module, folder: str, *, r: int, alpha: float, scale_policy: str,
                 base_model_name_or_path: str = ""):
    """adapter_config.json + adapter_model.safetensors in PEFT's layout, each written atomically."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for p, m in lora_modules(model).items():
        tensors[f"{PEFT_PREFIX}{p}.lora_A.weight"] = m.A.detach().float().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{p}.lora_B.weight"] = m.B.detach().float().cpu().contiguous()
    cfg = peft_config(model, r=r, alpha=alpha, scale_policy=scale_policy,
                      base_model_name_or_path=base_model_name_or_path)
    atomic_write(os.path.join(folder, "adapter_model.safetensors"), lambda t: save_file(tensors, t))
    atomic_json(os.path.join(folder, "adapter_config.json"), cfg)


def _peft_lookup(pattern: dict, name: str, default):
    """PEFT's own rule: the first key K with re.match(rf"(.*\\.)?({K})$", name) wins, else the default."""
    for key in pattern or {}:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def load_adapter(model: nn.Module, folder: str) -> dict[str, int]:
    """Apply the adapter saved in `folder` (ours or PEFT's) to a plain model; strict about paths and shapes."""
    from safetensors.torch import load_file
    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{folder}/adapter_config.json: peft_type {cfg.get('peft_type')!r}, expected 'LORA'")
    targets = cfg["target_modules"]
    targets = targets if isinstance(targets, list) else [targets]
    paths = target_paths(model, tuple(targets))
    excluded = set(cfg.get("exclude_modules") or [])
    r0, a0 = cfg["r"], cfg["lora_alpha"]
    ranks = {p: 0 if p in excluded else _peft_lookup(cfg.get("rank_pattern"), p, r0) for p in paths}
    alphas = {p: _peft_lookup(cfg.get("alpha_pattern"), p, a0) for p in paths}
    # PEFT's two formulas; per-module alphas carry any other policy (e.g. `constant`) scale for scale
    policy = "rslora" if cfg.get("use_rslora") else "fixed"
    apply_lora(model, r=r0, alpha=a0, targets=tuple(targets), rank_pattern=ranks, alpha_pattern=alphas,
               dropout=cfg.get("lora_dropout", 0.0), scale_policy=policy)
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    mods = lora_modules(model)
    expected = {f"{PEFT_PREFIX}{p}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight
                for p, m in mods.items() for ab in "AB"}  # capacity = rank here: full tensors
    extra = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if extra or missing:
        raise ValueError(f"{folder}: adapter does not fit the model: unexpected {extra[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for key, param in expected.items():
            if tensors[key].shape != param.shape:
                raise ValueError(f"{folder}: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(tensors[key])
    return ranks
