"""dynamic.py: the schedule, an exact budget after every move, outputs kept, a working optimiser."""

import numpy as np
import torch

import dynamic as D
import grpo
import lora as L
import model as M
from profiler import GradientProfiler


def test_schedule_has_warm_up_and_freeze():
    cfg = D.DynamicConfig(every=10, t_init=20, t_final=60)
    moves = [s for s in range(100) if D.should_move(s, cfg)]
    assert moves == [20, 30, 40, 50, 60]


def tiny(capacity=12):
    cfg = M.ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = M.Qwen2(cfg)
    m.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    L.apply_lora(m, r=8, alpha=16, capacity=capacity)
    with torch.no_grad():
        for p in L.lora_parameters(m):
            p.normal_(0, 0.05)
    return m


def step_grads(m, seed):
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(seed))
    m(ids).log_softmax(-1)[..., 0].mean().backward()


def test_budget_holds_after_every_move_and_the_optimiser_keeps_working():
    m = tiny()
    opt = grpo.make_optimizer(m, 1e-2)
    prof = GradientProfiler(m)
    cfg = D.DynamicConfig(every=1, t_init=1, t_final=100, window=2)
    history = []
    for step in range(6):
        step_grads(m, step)
        prof.record()
        opt.step()
        opt.zero_grad()
        ranks = D.reallocate(m, prof, opt, budget=32, r_min=5, r_max=12, cfg=cfg)
        history.append(ranks)
        assert sum(ranks) == 32 and min(ranks) >= 5 and max(ranks) <= 12
        assert D.layer_ranks(m) == ranks
        per_rank = sum(mod.base_layer.in_features + mod.base_layer.out_features
                       for p, mod in L.lora_modules(m).items() if p.startswith("model.layers.0."))
        assert L.count_lora_params(m)["total"] == 32 * per_rank  # the same total parameters as uniform
        assert prof.rank_now.sum() == 7 * 32
    assert any(h != [8] * 4 for h in history)  # rank actually moved
    assert all(np.isfinite(p.detach().numpy()).all() for p in L.lora_parameters(m))


def test_a_pure_move_keeps_the_output():
    m = tiny(capacity=16)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(ids)
        D.apply_layer_ranks(m, [12, 9, 16, 8])  # only growth: zero-effect new directions
        after = m(ids)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_moved_modules_get_fresh_optimiser_moments_only():
    m = tiny()
    opt = grpo.make_optimizer(m, 1e-2)
    step_grads(m, 0)
    opt.step()
    D.apply_layer_ranks(m, [10, 8, 8, 6], opt)
    for path, mod in L.lora_modules(m).items():
        moved = path.startswith(("model.layers.0.", "model.layers.3."))
        assert (mod.lora_A.weight in opt.state) != moved
