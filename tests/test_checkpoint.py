"""checkpoint.py: a round trip restores every piece of a run's state exactly; a partial checkpoint is refused."""

import random
import re

import numpy as np
import pytest
import torch

import checkpoint as C
import lora as L
import model as M
from conftest import adamw

CPU = torch.device("cpu")


def tiny_run(seed, steps):
    """A tiny Qwen2 with LoRA, AdamW and a schedule after `steps` steps on random gradients; when steps > 0,
    one adapter is then moved to rank 3 of its capacity 4, as a dynamic run does."""
    torch.manual_seed(seed)
    cfg = M.ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = M.Qwen2(cfg)
    m.init_weights(generator=torch.Generator().manual_seed(0))  # the same frozen base in every run
    L.apply_lora(m, r=2, alpha=4, capacity=4)
    opt = adamw(m, 1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (step + 1))
    for _ in range(steps):
        for p in L.lora_parameters(m):
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    if steps:
        L.lora_modules(m)["model.layers.1.mlp.down_proj"].set_rank(3, 0.5)
    return m, opt, sched


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_round_trip_restores_adapters_optimiser_schedule_and_rng_exactly(tmp_path):
    """Adapters (with a moved rank), AdamW moments, the schedule, the step and every RNG come back bit for bit."""
    path = str(tmp_path / "checkpoint.pt")
    m, opt, sched = tiny_run(seed=1, steps=3)
    C.save(path, 3, m, opt, sched, CPU)
    expected = draws()  # what the run would have drawn next
    fresh, fresh_opt, fresh_sched = tiny_run(seed=2, steps=0)  # other adapters, no optimiser state
    draws()
    assert C.load(path, fresh, fresh_opt, fresh_sched, CPU) == 3
    assert draws() == expected
    saved, loaded = L.adapter_state(m), L.adapter_state(fresh)
    assert saved.keys() == loaded.keys()
    for k, v in saved.items():
        assert torch.equal(v, loaded[k]) if torch.is_tensor(v) else v == loaded[k], k
    assert L.lora_modules(fresh)["model.layers.1.mlp.down_proj"].r == 3
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, s in a["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[name], b["state"][i][name]), (i, name)
    assert fresh_sched.state_dict() == sched.state_dict() and fresh_opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.lora_B.weight",
                                 "model.layers.1.mlp.down_proj._extra_state"])
def test_a_checkpoint_missing_adapter_state_is_refused(tmp_path, key):
    """A checkpoint lacking an adapter's B or rank is a ValueError naming file and key, not fresh values resumed."""
    path = str(tmp_path / "partial.pt")
    m, opt, sched = tiny_run(seed=1, steps=1)
    C.save(path, 1, m, opt, sched, CPU)
    state = torch.load(path, weights_only=True)
    del state["lora"][key]
    torch.save(state, path)
    fresh, fresh_opt, fresh_sched = tiny_run(seed=2, steps=0)
    refusal = rf"^{re.escape(path)}: does not fit the model \(.*missing \['{re.escape(key)}'\]"
    with pytest.raises(ValueError, match=refusal):
        C.load(path, fresh, fresh_opt, fresh_sched, CPU)
