"""profiler.py: exact norms, micro-batch accumulation, the s·√r scaling law, and the statistics."""

import math
import os
import sys

import numpy as np
import pytest
import torch

import lora as L
import model as M
import profiler as P
import rundir
from conftest import ROOT


def test_no_top_level_module_shadows_the_standard_library():
    names = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")]
    assert "profiler" in names
    assert not [n for n in names if n in sys.stdlib_module_names]


def tiny_lora_model(layers=3, seed=0, **lora_kw):
    cfg = M.ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = M.Qwen2(cfg)
    m.init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))
    L.apply_lora(m, **lora_kw)
    with torch.no_grad():  # B != 0 so that A gets a gradient too
        for p in L.lora_parameters(m):
            p.normal_(0, 0.05)
    return m


def loss_on(m, ids):
    return m(ids).log_softmax(-1)[..., 0].mean()


def test_norms_equal_norms_of_grad_and_accumulate_over_micro_batches(tmp_path):
    m = tiny_lora_model(r=3, rank_pattern={"model.layers.1.*": 5, "model.layers.2.mlp.up_proj": 0})
    prof = P.GradientProfiler(m)
    ids = torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(1))
    loss_on(m, ids[:2]).backward()  # two micro-batches accumulate into .grad
    loss_on(m, ids[2:]).backward()
    prof.record()
    row = prof.grad_norms[-1]
    for path, mod in L.lora_modules(m).items():
        layer, k = int(path.split(".")[2]), prof.kinds.index(path.rsplit(".", 1)[-1])
        assert row[layer, k, 0] == pytest.approx(mod.lora_A.weight.grad.norm().item(), rel=1e-6)
        assert row[layer, k, 1] == pytest.approx(mod.lora_B.weight.grad.norm().item(), rel=1e-6)
    assert np.isnan(row[2, prof.kinds.index("up_proj")]).all()  # rank 0: no adapter, no number
    # the accumulated gradient's norm, not the sum of per-micro-batch norms
    m.zero_grad()
    loss_on(m, ids[:2]).backward()
    prof.record()
    loss_on(m, ids[2:]).backward()
    prof.record()
    assert not np.allclose(prof.grad_norms[1], prof.grad_norms[0], equal_nan=True)
    prof.save(str(tmp_path))
    loaded = P.load_profile(str(tmp_path))
    assert loaded.grad_norms.shape == (3, 3, 7, 2)
    np.testing.assert_array_equal(loaded.grad_norms, np.stack(prof.grad_norms))
    assert loaded.ranks[0, 1, 0] == 5 and loaded.ranks[0, 2, prof.kinds.index("up_proj")] == 0
    assert os.path.isfile(tmp_path / rundir.PROFILE_SUMMARY)
    again = P.GradientProfiler(m)  # resume appends to the saved history
    again.load(str(tmp_path))
    again.record()
    assert len(again) == 4


@pytest.mark.parametrize("policy, exponent", [("fixed", -0.5), ("constant", 0.5), ("rslora", 0.0)])
def test_grad_B_norm_scales_like_s_sqrt_r_at_init(policy, exponent):
    """At init ∇B = s·G(Ax)ᵀ: its norm grows like s·√r, i.e. r^-0.5, r^+0.5 and r^0 for the three policies."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g)
    upstream = torch.randn(64, 80, generator=g)
    ranks = [2, 4, 8, 16, 32, 64]
    norms = []
    for r in ranks:
        vals = []
        for seed in range(30):
            torch.manual_seed(seed)
            mod = L.LoRALinear(torch.nn.Linear(96, 80), r, L.lora_scale(policy, 16.0, r, 8))
            (mod(x) * upstream).sum().backward()
            vals.append(mod.lora_B.weight.grad.norm().item())
        norms.append(np.mean(vals))
    slope = np.polyfit(np.log(ranks), np.log(norms), 1)[0]
    assert abs(slope - exponent) < 0.05, slope


def synthetic_profile(layer_weights, steps=30, ranks=None, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    Lr = len(layer_weights)
    w = np.asarray(layer_weights, float)[None, :, None, None]
    g = np.ones((steps, Lr, 7, 2)) * w / math.sqrt(14)  # each layer's total norm = its weight
    g = g * (1 + noise * rng.standard_normal(g.shape))
    r = np.full((steps, Lr, 7), 32 if ranks is None else 0, np.int32)
    if ranks is not None:
        r[:] = np.asarray(ranks)[None, :, None]
    return P.Profile(g.astype(np.float32), r, np.full(r.shape, 2.0, np.float32), list(L.TARGETS))


def test_statistics_on_known_profiles():
    flat = P.flatness(synthetic_profile([1.0] * 28))
    assert flat["max_min_ratio"] == pytest.approx(1.0) and flat["top30_share"] == pytest.approx(30.0)
    peaked = P.flatness(synthetic_profile([1.0] * 10 + [9.0] * 10))
    assert peaked["max_min_ratio"] == pytest.approx(9.0)
    assert peaked["top30_share"] == pytest.approx(100 * 6 * 9 / 100)  # top 6 of 20 layers, each 9% of 100
    assert peaked["hottest_share"] == pytest.approx(9.0) and peaked["coldest_share"] == pytest.approx(1.0)
    w = np.linspace(1, 2, 28)
    stable = P.flatness(synthetic_profile(w, noise=0.01))
    assert stable["early_late_corr"] > 0.95 and stable["hottest_layer"] == 27 and stable["coldest_layer"] == 0


def test_amplification_and_normalised_view():
    base = synthetic_profile([1.0] * 8, ranks=[32] * 8)
    ranks = [16, 48, 32, 24, 40, 32, 20, 44]
    follows = synthetic_profile(np.sqrt(np.array(ranks) / 32), ranks=ranks)  # gradient ∝ √r: follows the rank
    assert P.amplification(base, follows) > 0.99
    # dividing by s·√r removes exactly that mechanical effect (s is the same here)
    assert P.flatness(follows, normalised=True)["max_min_ratio"] == pytest.approx(1.0)
    # ... so in the normalised view nothing moved: "no shift", not a correlation of rounding noise
    assert math.isnan(P.amplification(base, follows, normalised=True))
    noisy = synthetic_profile(np.ones(8) * (1 + 1e-9 * np.arange(8)), ranks=ranks)
    assert math.isnan(P.amplification(base, noisy))  # 1e-7-level share changes: no shift
    half = synthetic_profile(1 + 0.1 * (np.array(ranks) - 32) / 16, ranks=ranks)  # shift linear in the rank
    assert P.amplification(base, half) == pytest.approx(1.0)
    anti = synthetic_profile(1 - 0.1 * (np.array(ranks) - 32) / 16, ranks=ranks)
    assert P.amplification(base, anti) == pytest.approx(-1.0)


def test_a_layer_norm_is_the_norm_of_all_its_matrices_together():
    """Layer 0's matrices have norms 3 and 4 (the rest 0), layer 1's a single 5: both layers' norms are 5
    (sqrt of the sum of squares), so their shares are equal; a sum of matrix norms would give 7 vs 5."""
    g = np.zeros((4, 2, 7, 2), np.float32)
    g[:, 0, 0, 0], g[:, 0, 3, 1], g[:, 1, 5, 0] = 3.0, 4.0, 5.0
    p = P.Profile(g, np.full((4, 2, 7), 8, np.int32), np.full((4, 2, 7), 2.0, np.float32), list(L.TARGETS))
    np.testing.assert_allclose(P.layer_norms(p), 5.0)
    np.testing.assert_allclose(P.layer_shares(p), [50.0, 50.0])


def test_early_and_late_are_the_first_and_last_third():
    """30 steps: the first third follows w, the middle is flat, the last third follows reversed w: the
    correlation of the first and last third is that of w and reversed w (-1); halves mix in the middle."""
    w = np.array([1.0, 2.0, 3.0, 5.0, 4.0, 1.5])
    g = np.ones((30, 6, 7, 2)) / math.sqrt(14)
    g[:10] *= w[None, :, None, None]
    g[20:] *= w[::-1][None, :, None, None]
    p = P.Profile(g.astype(np.float32), np.full((30, 6, 7), 8, np.int32), np.full((30, 6, 7), 2.0, np.float32),
                  list(L.TARGETS))
    f = P.flatness(p)
    assert f["early_late_corr"] == pytest.approx(np.corrcoef(w, w[::-1])[0, 1], abs=1e-6)
    early, late = (w + 1 * 5) / 15, (w[::-1] + 5) / 15  # halves: 10 steps of w and 5 flat, over 15 steps
    assert f["early_late_corr_halves"] == pytest.approx(np.corrcoef(early, late)[0, 1], abs=1e-6)


def test_alternative_definitions_on_a_study_like_profile():
    """Shares of squared norms square the spread; the top 30% of 28 layers is 8.4 layers: top 8 <
    interpolated < top 9. Expected values computed here from the sorted shares by hand."""
    w = np.linspace(2.15, 4.68, 28)
    f = P.flatness(synthetic_profile(w))
    shares = 100 * w / w.sum()
    top = np.sort(shares)[::-1]
    assert f["max_min_ratio"] == pytest.approx(4.68 / 2.15, rel=1e-5)
    assert f["max_min_ratio_squared"] == pytest.approx((4.68 / 2.15) ** 2, rel=1e-5)
    assert f["top30_share_floor"] == pytest.approx(top[:8].sum(), rel=1e-5)
    assert f["top30_share_ceil"] == pytest.approx(top[:9].sum(), rel=1e-5)
    assert f["top30_share"] == pytest.approx(top[:8].sum() + 0.4 * top[8], rel=1e-5)


def test_report_cli(tmp_path, capsys):
    for name, prof in (("u", synthetic_profile([1.0] * 8, ranks=[32] * 8)),
                       ("r", synthetic_profile(np.linspace(1, 2, 8), ranks=[16, 48, 32, 24, 40, 32, 20, 44]))):
        d = tmp_path / name
        d.mkdir()
        from safetensors.numpy import save_file
        save_file({"grad_norms": prof.grad_norms, "ranks": prof.ranks, "scales": prof.scales},
                  str(d / rundir.PROFILE), metadata={"modules": '["q_proj","k_proj","v_proj","o_proj",'
                                                     '"gate_proj","up_proj","down_proj"]', "layers": "8"})
    P.main([str(tmp_path / "u"), str(tmp_path / "r")])
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()
    assert [line.split()[3] for line in table[1:]] == ["raw", "norm", "raw", "norm"] and "rank~shift" in table[0]
    assert "other definitions" in out and "top 2" in out and "top 3" in out  # 0.3 x 8 layers = 2.4
    with pytest.raises(SystemExit, match="no gradient profile"):
        P.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match=r"--plot .*f\.png: folder .*nowhere does not exist"):
        P.main([str(tmp_path / "u"), "--plot", str(tmp_path / "nowhere" / "f.png")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / rundir.PROFILE).write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="profile.safetensors: not a gradient profile"):
        P.main([str(tmp_path / "bad")])


def test_a_dynamic_runs_layer_ranks_are_those_of_its_last_step():
    """Ranks move twice during a run: layer_ranks and the summary's final ranks are the last step's, not
    the first's or a middle step's; a module without an adapter (rank 0) is left out of its layer's mean."""
    p = synthetic_profile(np.ones(4), steps=6, ranks=[8] * 4)
    p.ranks[2:] = np.array([4, 8, 12, 8])[:, None]
    p.ranks[5:] = np.array([6, 10, 8, 8])[:, None]
    p.ranks[:, 3, 0] = 0  # layer 3's q_proj has no adapter: its mean is over the other six modules
    np.testing.assert_array_equal(p.layer_ranks, [6, 10, 8, 8])
    assert P.summary(p)["layer_ranks"] == [6, 10, 8, 8]


def test_plot_writes_a_png_with_a_rank_history_for_dynamic_runs(tmp_path, monkeypatch):
    """The figure's bars are each run's last-step ranks, and the dynamic run (only it) gets a layers x steps
    rank-history image whose column j is step j + 1, a module without an adapter left out of the mean."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from safetensors.numpy import save_file
    static = synthetic_profile(np.linspace(1, 2, 6), ranks=[8] * 6)
    moving = synthetic_profile(np.linspace(1, 2, 6), ranks=[8] * 6)
    moving.ranks[15:] = np.array([6, 7, 8, 8, 9, 10])[:, None]
    moving.ranks[:, 2, 5] = 0  # layer 2's up_proj has no adapter: its history stays 8, not 8·6/7
    for name, prof in (("s", static), ("d", moving)):
        (tmp_path / name).mkdir()
        save_file({"grad_norms": prof.grad_norms, "ranks": prof.ranks, "scales": prof.scales},
                  str(tmp_path / name / rundir.PROFILE), metadata={"modules": '["q_proj","k_proj","v_proj",'
                  '"o_proj","gate_proj","up_proj","down_proj"]', "layers": "6"})
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))  # closed, still readable
    assert P.plot([str(tmp_path / "s"), str(tmp_path / "d")], str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    bars = {c.get_label(): [r.get_height() for r in c] for c in fig.axes[2].containers}
    assert bars == {"s": [8] * 6, "d": [6, 7, 8, 8, 9, 10]}
    (image,) = [im for ax in fig.axes for im in ax.images]  # one history: the static run has none
    history = np.full((6, 30), 8.0)
    history[:, 15:] = np.array([6, 7, 8, 8, 9, 10])[:, None]
    np.testing.assert_array_equal(image.get_array(), history)  # [layers, steps]
    assert image.get_extent() == [0.5, 30.5, -0.5, 5.5] and image.axes.get_title().startswith("d: ")


def test_what_each_scale_policy_predicts_for_rank_shift_at_initialisation():
    """The study's amplification statistic (rank vs change of gradient share) on an 8-layer model at
    initialisation, random ranks 4-12 against uniform 8, three seeds: before any learning, the raw statistic
    already has the sign of the policy's s·√r law (fixed alpha: r^-0.5, negative; constant scale: r^+0.5,
    positive); rsLoRA's s·√r is constant, so its raw view equals the normalised one, which has no sign of
    its own. Measured over 5 seeds: fixed -0.74..-0.96, constant +0.77..+0.92, rsLoRA/normalised -0.58..+0.32."""
    import allocate as A

    def profile(policy, ranks, seed):
        cfg = M.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        m = M.Qwen2(cfg)
        m.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(seed)
        L.apply_lora(m, r=8, alpha=16, scale_policy=policy, rank_pattern=A.rank_pattern(ranks))
        prof = P.GradientProfiler(m)
        for s in range(3):
            m.zero_grad()
            loss_on(m, torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(100 + s))).backward()
            prof.record()
        return prof.profile()

    amp = {}
    for policy in L.SCALE_POLICIES:
        for seed in range(3):
            base, other = profile(policy, [8] * 8, seed), profile(policy, A.allocate("random", 8, 64, seed=seed), seed)
            amp.setdefault(policy, []).append((P.amplification(base, other), P.amplification(base, other, True)))
    assert max(raw for raw, _ in amp["fixed"]) < -0.5
    assert min(raw for raw, _ in amp["constant"]) > 0.5
    for (raw, norm), (_, norm_fixed) in zip(amp["rslora"], amp["fixed"]):
        assert raw == pytest.approx(norm, abs=1e-6) and norm == pytest.approx(norm_fixed, abs=1e-6)
