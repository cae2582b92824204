"""lora.py against PEFT (test-only oracle), plus the study's rank_pattern trap and exact counts."""

import re

import pytest
import torch

import lora as L
import model as M
from conftest import make_hf_model


def tiny_pair(tmp_path, name="untied"):
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf, M.from_pretrained(str(tmp_path))


RANKS = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.*": 2, "model.layers.2.*": 6,
         "model.layers.0.mlp.down_proj": 0}


def randomise_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in L.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_model_like(hf, ours, policy):
    """PEFT LoRA on the transformers model with the same ranks/scales and our adapter weights."""
    from peft import LoraConfig, get_peft_model
    cfg = L.peft_config(ours, r=3, alpha=8.0, scale_policy=policy)
    lcfg = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
                      exclude_modules=cfg["exclude_modules"], rank_pattern=cfg["rank_pattern"],
                      alpha_pattern=cfg["alpha_pattern"], use_rslora=cfg["use_rslora"], lora_dropout=0.0)
    peft = get_peft_model(hf, lcfg)
    sd = {k.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.default.weight"): v
          for k, v in {f"base_model.model.{p}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight
                       for p, m in L.lora_modules(ours).items() for ab in "AB"}.items()}
    missing = peft.load_state_dict(sd, strict=False)
    assert not missing.unexpected_keys
    return peft


@pytest.mark.parametrize("policy", L.SCALE_POLICIES)
def test_logits_and_gradients_match_peft(tmp_path, policy):
    hf, ours = tiny_pair(tmp_path)
    ranks = L.apply_lora(ours, r=3, alpha=8.0, rank_pattern=RANKS, scale_policy=policy)
    assert ranks["model.layers.0.mlp.down_proj"] == 0 and ranks["model.layers.2.mlp.up_proj"] == 6
    randomise_lora(ours)
    peft = peft_model_like(hf, ours, policy)
    ids = torch.randint(0, 131, (2, 10), generator=torch.Generator().manual_seed(4))
    a, b = ours(ids), peft(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    (a.square().mean()).backward()
    (b.square().mean()).backward()
    peft_params = dict(peft.named_parameters())
    for p, m in L.lora_modules(ours).items():
        for ab in "AB":
            ref = peft_params[f"base_model.model.{p}.lora_{ab}.default.weight"]
            assert ref.shape == getattr(m, f"lora_{ab}").weight.shape
            g, rg = getattr(m, f"lora_{ab}").weight.grad, ref.grad
            assert (g - rg).norm() <= 1e-5 * rg.norm() + 1e-12, (p, ab)


def test_adapter_round_trip_with_peft(tmp_path):
    from peft import PeftModel
    hf, ours = tiny_pair(tmp_path / "base")
    applied = L.apply_lora(ours, r=3, alpha=8.0, rank_pattern=RANKS, scale_policy="constant")
    randomise_lora(ours, seed=1)
    L.save_adapter(ours, str(tmp_path / "ad"), r=3, alpha=8.0, scale_policy="constant")
    ids = torch.randint(0, 131, (2, 10), generator=torch.Generator().manual_seed(5))
    loaded = PeftModel.from_pretrained(hf, str(tmp_path / "ad"))
    with torch.no_grad():
        assert (ours(ids) - loaded(input_ids=ids).logits).abs().max() <= 1e-5
    # and PEFT's own save loads back into ours
    loaded.save_pretrained(str(tmp_path / "peft"))
    fresh = M.from_pretrained(str(tmp_path / "base"))
    ranks = L.load_adapter(fresh, str(tmp_path / "peft"))
    assert ranks == applied
    with torch.no_grad():
        assert (fresh(ids) - ours(ids)).abs().max() <= 1e-5


def test_peft_saved_non_uniform_rank_pattern_loads(tmp_path):
    from peft import LoraConfig, get_peft_model
    hf, ours = tiny_pair(tmp_path / "base")
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=list(L.TARGETS),
                     rank_pattern={"model.layers.1.self_attn.v_proj": 7, "up_proj": 3}, init_lora_weights=False)
    peft = get_peft_model(hf, cfg)
    peft.save_pretrained(str(tmp_path / "p"))
    ranks = L.load_adapter(ours, str(tmp_path / "p"))
    assert ranks["model.layers.1.self_attn.v_proj"] == 7 and ranks["model.layers.2.mlp.up_proj"] == 3
    assert ranks["model.layers.0.self_attn.q_proj"] == 2
    ids = torch.randint(0, 131, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours(ids) - peft(input_ids=ids).logits).abs().max() <= 1e-5


def test_exported_keys_select_exactly_under_peft_regex_rule():
    with torch.device("meta"):
        m = M.Qwen2(M.ModelConfig())
    pattern = {f"model.layers.{i}.*": 20 + i for i in range(28)}
    ranks = L.apply_lora(m, r=32, rank_pattern=pattern)
    cfg = L.peft_config(m, r=32, alpha=64.0, scale_policy="fixed")
    paths = list(ranks)
    from peft.utils.other import get_pattern_key  # PEFT's own matcher, not a copy of it
    for p in paths:  # PEFT's rule on our exported keys gives back exactly our rank
        key = get_pattern_key(cfg["rank_pattern"].keys(), p)
        assert cfg["rank_pattern"].get(key, cfg["r"]) == ranks[p]
        assert L._peft_lookup(cfg["rank_pattern"], p, cfg["r"]) == ranks[p]  # our loader's copy agrees


def test_init_is_peft_s_B_zero_A_kaiming_so_the_model_starts_unchanged(tmp_path):
    _, ours = tiny_pair(tmp_path)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = ours(ids)
    L.apply_lora(ours, r=4, rank_pattern=RANKS)
    for mod in L.lora_modules(ours).values():
        assert torch.equal(mod.lora_B.weight, torch.zeros_like(mod.lora_B.weight))
        bound = 1 / mod.base_layer.in_features ** 0.5  # kaiming_uniform(a=√5) = U(-1/√in, 1/√in)
        assert 0 < mod.lora_A.weight.abs().max() <= bound and mod.lora_A.weight.abs().max() > 0.8 * bound
    with torch.no_grad():
        assert torch.equal(ours(ids), before)


def test_study_trap_wildcard_means_what_it_says():
    with torch.device("meta"):
        m = M.Qwen2(M.ModelConfig())
    paths = L.target_paths(m)
    assert len(paths) == 196
    hits = L.resolve_pattern({"model.layers.15.*.q_proj": 40}, paths)
    assert hits == {"model.layers.15.self_attn.q_proj": 40}
    hits = L.resolve_pattern({"model.layers.1.*.q_proj": 8}, paths)
    assert list(hits) == ["model.layers.1.self_attn.q_proj"]  # not layers 10-19
    # ... whereas PEFT's regex rule reads the same key as matching layers 1 and 10-19
    peft_hits = [p for p in paths if re.match(r"(.*\.)?(model.layers.1.*.q_proj)$", p)]
    assert len(peft_hits) == 11
    with pytest.raises(ValueError, match=r"'model\.layer\.15\.self_attn\.q_proj' matches no targeted module.*"
                                         r"model\.layers\.15\.self_attn\.q_proj"):
        L.resolve_pattern({"model.layer.15.self_attn.q_proj": 40}, paths)


def test_did_you_mean_suggests_paths_by_structure():
    """A key for a layer the model lacks suggests the same projection in the nearest layers, not text
    look-alikes such as up_proj paths."""
    with torch.device("meta"):
        m = M.Qwen2(M.ModelConfig(num_hidden_layers=4))
    paths = L.target_paths(m)
    with pytest.raises(ValueError) as e:
        L.resolve_pattern({"model.layers.9.*.q_proj": 8}, paths)
    assert str(e.value).endswith("['model.layers.3.self_attn.q_proj', 'model.layers.2.self_attn.q_proj', "
                                 "'model.layers.1.self_attn.q_proj']")
    with pytest.raises(ValueError) as e:
        L.resolve_pattern({"model.layers.2.self_attn.qproj": 8}, paths)  # a typo: the layer's own paths first
    assert "['model.layers.2.self_attn.q_proj'" in str(e.value)


def test_most_specific_key_wins_and_ties_are_errors():
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    got = L.resolve_pattern({"*": 1, "model.layers.0.*": 2, "model.layers.0.mlp.up_proj": 3}, paths)
    assert got == {paths[0]: 2, paths[1]: 3, paths[2]: 1}
    with pytest.raises(ValueError, match="equally specifically"):
        L.resolve_pattern({"model.layers.?.mlp.up_proj": 2, "model.layers.0.mlp.up_pro?": 3}, paths)


def test_counts_on_the_real_shape():
    with torch.device("meta"):
        m = M.Qwen2(M.ModelConfig())
    L.apply_lora(m, r=32)
    counts = L.count_lora_params(m)
    assert counts["total"] == 36_929_536 == 28 * 32 * 41_216
    assert set(counts["per_layer"].values()) == {32 * 41_216}
    with torch.device("meta"):
        m = M.Qwen2(M.ModelConfig())
    L.apply_lora(m, r=30)  # "34.6M": what a run gets when every module falls back to a default r=30
    assert L.count_lora_params(m)["total"] == 34_621_440
    assert "q_proj" not in L.rank_table({"model.layers.0.self_attn.q_proj": 3}).split("\n")[1]
    assert L.rank_table(L.apply_lora(M.Qwen2(M.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          num_key_value_heads=1)), r=2)).count("\n") == 1


def test_only_lora_is_trainable_and_rank0_stays_linear(tmp_path):
    _, ours = tiny_pair(tmp_path)
    L.apply_lora(ours, r=3, rank_pattern=RANKS)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(L.lora_parameters(ours)) == len(trainable)
    assert type(ours.model.layers[0].mlp.down_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="already has LoRA"):
        L.apply_lora(ours)


def test_merge_unmerge_and_disable_round_trip(tmp_path):
    _, ours = tiny_pair(tmp_path)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    ids = torch.randint(0, 131, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        plain = ours(ids)
        L.apply_lora(ours, r=4, rank_pattern=RANKS)
        randomise_lora(ours)
        adapted = ours(ids)
        assert (adapted - plain).abs().max() > 1e-3  # the adapter does something
        with L.disable_adapters(ours):
            assert torch.equal(ours(ids), plain)
        addresses = [m.base_layer.weight.data_ptr() for m in L.lora_modules(ours).values()]
        with L.merged(ours):
            assert (ours(ids) - adapted).abs().max() <= 1e-5 * adapted.abs().max()  # fp32 rounding
            # merged in place: a captured CUDA graph keeps reading the right weights
            assert [m.base_layer.weight.data_ptr() for m in L.lora_modules(ours).values()] == addresses
            with pytest.raises(RuntimeError, match="unmerge"):
                with L.disable_adapters(ours):
                    pass
        assert torch.equal(ours(ids), adapted)
    for name, m in L.lora_modules(ours).items():  # unmerge restores the base weights bit for bit
        assert torch.equal(m.base_layer.weight, base[name + ".weight"])


def test_scale_policies():
    assert L.lora_scale("fixed", 64, 16, 32) == 4.0
    assert L.lora_scale("constant", 64, 16, 32) == 2.0
    assert L.lora_scale("rslora", 64, 16, 32) == 16.0
    with pytest.raises(ValueError, match="allowed"):
        L.lora_scale("other", 1, 1, 1)


def test_load_refuses_adapter_that_does_not_fit(tmp_path):
    _, ours = tiny_pair(tmp_path / "a")
    L.apply_lora(ours, r=3)
    L.save_adapter(ours, str(tmp_path / "ad"), r=3, alpha=64.0, scale_policy="fixed")
    other = M.from_pretrained(str(tmp_path / "a"))
    other.model.layers[2].mlp.up_proj = torch.nn.Linear(96, 161, bias=False)  # a different shape
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.up_proj\.lora_B\.weight.*shape"):
        L.load_adapter(other, str(tmp_path / "ad"))


def test_set_rank_grows_exactly_and_shrinks_to_the_best_approximation():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20)
    m = L.LoRALinear(base, 4, L.lora_scale("fixed", 8.0, 4, 4), capacity=10)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(5, 24)
    before, delta = m(x), m.delta_weight()
    assert (m.lora_A.weight.grad is None) and m.capacity == 10
    m.set_rank(7, L.lora_scale("fixed", 8.0, 7, 4))  # grow, with the scale alpha/r changing too
    assert m.r == 7 and torch.allclose(m(x), before, atol=1e-5)
    m.set_rank(7, m.scale)  # a pure re-parametrisation
    assert torch.allclose(m(x), before, atol=1e-5)
    S = torch.linalg.svdvals(delta)
    m.set_rank(2, L.lora_scale("fixed", 8.0, 2, 4))  # shrink: the best rank-2 approximation (Eckart-Young)
    err = (m.delta_weight() - delta).norm()
    assert abs(err - S[2:].norm()) < 1e-4
    assert m.lora_A.weight[2:].abs().sum() == 0 and m.lora_B.weight[:, 2:].abs().sum() == 0
    m(x).sum().backward()  # rows beyond the active rank get exactly zero gradient
    assert m.lora_A.weight.grad[2:].abs().sum() == 0 and m.lora_B.weight.grad[:, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="capacity"):
        m.set_rank(11, 1.0)


def test_rank_and_scale_travel_with_the_state_dict():
    """A moved adapter's (r, scale) is part of its state: load_state_dict restores it, no side map."""
    cfg = M.ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    a, b = M.Qwen2(cfg), M.Qwen2(cfg)
    for m in (a, b):
        L.apply_lora(m, r=4, alpha=8, capacity=8)
    mod = L.lora_modules(a)["model.layers.1.mlp.up_proj"]
    mod.set_rank(7, 8 / 7)
    state = L.adapter_state(a)
    assert state["model.layers.1.mlp.up_proj._extra_state"] == {"r": 7, "scale": 8 / 7}
    b.load_state_dict(state, strict=False)
    moved = L.lora_modules(b)["model.layers.1.mlp.up_proj"]
    assert (moved.r, moved.scale) == (7, 8 / 7) and torch.equal(moved.A, mod.A)
    with pytest.raises(ValueError, match="outside"):
        moved.set_extra_state({"r": 9, "scale": 1.0})


def saved_activation_bytes(fn, params):
    """Bytes autograd keeps for backward while fn() builds its graph, each storage once, parameters not
    counted (they exist anyway)."""
    skip, storages = {p.untyped_storage().data_ptr() for p in params}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_a_bf16_input_is_not_copied_to_fp32_for_backward():
    """On a bf16 base (the CUDA setting) LoRA computes in fp32 but keeps the bf16 input for backward,
    not an fp32 copy of it per adapter (q, k and v: one input, three copies); outputs and gradients are
    those of the plain computation, autograd through x.float()."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 64).bfloat16().requires_grad_()
    mods = [L.LoRALinear(torch.nn.Linear(64, 64, bias=False).bfloat16().requires_grad_(False), 8, 2.0)
            for _ in range(3)]
    for m in mods:
        torch.nn.init.normal_(m.lora_B.weight)
    params = [p for m in mods for p in m.parameters()]
    x_bytes, a_bytes = x.numel() * 2, 3 * 4 * 16 * 8 * 4  # the bf16 input; each adapter's r-wide product
    out, saved = saved_activation_bytes(lambda: sum(m(x).float() for m in mods), params)
    assert saved == x_bytes + a_bytes
    xp = x.detach().requires_grad_()

    def plain(m):
        a = torch.nn.functional.linear(xp.float(), m.A)
        return m.base_layer(xp) + (torch.nn.functional.linear(a, m.B) * m.scale).to(torch.bfloat16)

    want, plain_saved = saved_activation_bytes(lambda: sum(plain(m).float() for m in mods), params)
    assert plain_saved == 3 * 2 * x_bytes + a_bytes  # three fp32 copies of x, twice x's bf16 bytes each
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x] + [m.lora_A.weight for m in mods], g)
    want_grads = torch.autograd.grad(want, [xp] + [m.lora_A.weight for m in mods], g)
    for a, b in zip(got[1:], want_grads[1:]):  # A's gradients: fp32
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # x's gradient is a bf16 sum of four terms, rounded in whichever order autograd adds them: it must be
    # as close to the exact fp32 gradient as the plain computation's is
    xf = x.detach().float().requires_grad_()
    exact = sum(torch.nn.functional.linear(xf, m.base_layer.weight.float()) +
                torch.nn.functional.linear(torch.nn.functional.linear(xf, m.A), m.B) * m.scale for m in mods)
    exact_grad = torch.autograd.grad(exact, xf, g)[0]
    err, plain_err = ((grad.float() - exact_grad).abs().max() for grad in (got[0], want_grads[0]))
    assert err <= 2 * plain_err and plain_err < 0.01 * exact_grad.abs().max()


def test_fp32_adapter_is_folded_into_the_weight_with_exact_gradients():
    """An fp32 base folds s·B·A into its weight (FoldedLoRA): in float64 its gradients pass gradcheck
    for x, A and B, with a bias, a scale other than 1 and a capacity above the active rank (the unused
    rows get no gradient); in fp32 it equals the unfolded computation to rounding; a bf16 base, a
    trainable base or dropout keep the unfolded form."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=True).double().requires_grad_(False)
    m = L.LoRALinear(base, r=2, scale=1.5, capacity=3)
    m.lora_A.weight.data, m.lora_B.weight.data = m.lora_A.weight.double(), torch.randn(5, 3).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: L.FoldedLoRA.apply(x, base.weight, base.bias, A, B, 1.5),
                                    (x, m.A.detach().requires_grad_(), m.B.detach().requires_grad_()))
    m(x).square().sum().backward()
    assert m.lora_A.weight.grad[2:].eq(0).all() and m.lora_B.weight.grad[:, 2:].eq(0).all()

    def unfolded(m, x):
        return m.base_layer(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, m.A), m.B) * m.scale

    m32 = L.LoRALinear(torch.nn.Linear(64, 48).requires_grad_(False), r=8, scale=2.0)
    torch.nn.init.normal_(m32.lora_B.weight)
    x32 = torch.randn(3, 7, 64, requires_grad=True)
    g = torch.randn(3, 7, 48)
    params = [x32, m32.lora_A.weight, m32.lora_B.weight]
    got, want = m32(x32), unfolded(m32, x32)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)

    def folded(m, x):
        return "FoldedLoRA" in type(m(x).grad_fn).__name__

    assert folded(m32, x32)
    assert not folded(L.LoRALinear(torch.nn.Linear(64, 48).bfloat16().requires_grad_(False), 8, 2.0),
                      x32.bfloat16())
    assert not folded(L.LoRALinear(torch.nn.Linear(64, 48), 8, 2.0), x32)  # the base trains too
    assert not folded(L.LoRALinear(torch.nn.Linear(64, 48).requires_grad_(False), 8, 2.0, dropout=0.1), x32)


def test_an_adapter_at_full_capacity_hands_autograd_its_weights_not_slices():
    """At r = capacity A and B are the parameters themselves: a slice of all of a weight costs its
    backward a weight-sized zero tensor and a copy, per adapter per pass. Below capacity they are the
    active rows, and the unused rows get no gradient."""
    full = L.LoRALinear(torch.nn.Linear(8, 6).requires_grad_(False), r=4, scale=1.0)
    assert full.A is full.lora_A.weight and full.B is full.lora_B.weight
    part = L.LoRALinear(torch.nn.Linear(8, 6).requires_grad_(False), r=2, scale=1.0, capacity=4)
    assert part.A.shape == (2, 8) and part.B.shape == (6, 2)
    torch.nn.init.normal_(part.lora_B.weight)
    part(torch.randn(3, 8)).sum().backward()
    assert part.lora_A.weight.grad[2:].eq(0).all() and part.lora_A.weight.grad[:2].ne(0).all()
