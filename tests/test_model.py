"""model.py against transformers' Qwen2ForCausalLM (test-only oracle) on random weights."""

import json
import os

import pytest
import torch

import model as M
from conftest import QWEN_TOKENIZER, hf_config_dict, make_hf_model

TOL = 1e-4


def test_single_prompt_logits_match(hf_pair):
    hf, folder = hf_pair
    ours = M.from_pretrained(folder)
    ids = torch.randint(0, hf.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= TOL


def test_left_padded_batch_matches(hf_pair):
    hf, folder = hf_pair
    ours = M.from_pretrained(folder)
    ids = torch.randint(0, hf.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    with torch.no_grad():
        diff = (ours(ids, mask) - hf(ids, attention_mask=mask).logits).abs() * mask[..., None]
    assert diff.max() <= TOL


def test_cached_decoding_equals_full_recompute(hf_pair):
    hf, folder = hf_pair
    ours = M.from_pretrained(folder)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # second row left-padded
    with torch.no_grad():
        full = ours(ids, mask)
        ref = hf(ids, attention_mask=mask).logits
        cache = M.KVCache(ours.config, 2, 16, "cpu", torch.float32)
        steps = [ours(ids[:, :6], mask[:, :6], cache=cache)]
        for t in range(6, 12):
            steps.append(ours(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache))
        inc = torch.cat(steps, dim=1)
    valid = mask[..., None].bool()
    assert ((inc - full).abs() * valid).max() <= TOL
    assert ((inc - ref).abs() * valid).max() <= TOL


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("untied")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ours = M.from_pretrained(str(tmp_path))
    ids = torch.arange(20)[None] % hf.config.vocab_size
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= TOL


def test_greedy_generate_equals_transformers(hf_pair):
    hf, folder = hf_pair
    ours = M.from_pretrained(folder)
    prompts = [[5, 9, 2, 7, 11, 3], [8, 4, 6]]
    stop, pad = 1, 0  # eos_token_id=1 in the tiny config
    out, mask = M.generate(ours, prompts, max_new_tokens=12, stop_ids=[stop], pad_id=pad)
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=stop,
                          pad_token_id=pad)[0, len(p):]
        n = int(mask[i].sum())
        assert out[i, :n].tolist() == ref[:n].tolist()
        if n < len(ref):  # we stopped: transformers stopped at the same stop token
            assert out[i, n - 1].item() == stop


def test_sampling_is_seeded_and_masks_after_stop(hf_pair):
    hf, folder = hf_pair
    ours = M.from_pretrained(folder)
    prompts = [[5, 9, 2], [8, 4, 6, 1, 2]]
    runs = [M.generate(ours, prompts, 20, stop_ids=[1, 2], pad_id=0, num_samples=4, temperature=1.5,
                       top_k=50, top_p=0.95, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    (a, ma), (b, mb) = runs
    assert a.shape[0] == 8 and torch.equal(a, b) and torch.equal(ma, mb)
    for row, m in zip(a, ma):
        stops = [t for t, x in enumerate(row.tolist()) if x in (1, 2)]
        n = int(m.sum())
        if stops:
            assert n == stops[0] + 1 and (row[n:] == 0).all()  # pad after the first stop
        else:
            assert n == row.shape[0]
        assert m[:n].all()


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    u = M.uniforms(len(logits), g, "cpu")
    assert set(M.sample_next(logits, 1.0, 2, None, u).tolist()) == {0, 1}
    # p = softmax ~ [.64, .24, .09, .03, .01]: top_p 0.8 keeps the first two only
    assert set(M.sample_next(logits, 1.0, None, 0.8, u).tolist()) == {0, 1}
    assert set(M.sample_next(logits, 0.0, None, None, None).tolist()) == {0}


@pytest.mark.parametrize("shape, params", [
    (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
          num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True), 494_032_768),
    (dict(), 1_543_714_304),  # the defaults are Qwen2.5-1.5B
    (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
          num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False), 7_615_616_512),
])
def test_real_shapes_parameter_counts(shape, params):
    with torch.device("meta"):
        m = M.Qwen2(M.ModelConfig(**shape))
    assert sum(p.numel() for p in m.parameters()) == params


def test_state_dict_keys_equal_transformers():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    for tie in (True, False):
        kw = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
        hf = Qwen2ForCausalLM(Qwen2Config(**kw))
        ours = M.Qwen2(M.ModelConfig(**kw))
        assert set(ours.state_dict()) == set(hf.state_dict())
        assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie


def test_chat_format_exact():
    text = M.Tokenizer.chat([{"role": "user", "content": "What is 2+2?"}])
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    text = M.Tokenizer.chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                            add_generation_prompt=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


@pytest.mark.skipif(not os.path.isfile(QWEN_TOKENIZER), reason="shared Qwen2.5 tokenizer absent")
def test_real_qwen_tokenizer():
    tok = M.load_tokenizer(QWEN_TOKENIZER)
    assert tok.encode("<|im_start|>") == [151644] and tok.encode("<|im_end|>") == [151645]
    assert tok.stop_ids == [151645, 151643]
    assert tok.encode("Hello world") == [9707, 1879]
    s = "Natalia sold 48/2 = 24 clips in May. Ünïcödé ✓ 日本語\n#### 72"
    assert tok.decode(tok.encode(s)) == s
    chat = tok.chat([{"role": "user", "content": "Hi"}])
    assert tok.encode(chat)[:1] == [151644] and tok.encode(chat)[-3:-1] == [151644, 77091]


def test_tiny_tokenizer_round_trips():
    from tiny import train_tiny_tokenizer
    tok = M.Tokenizer(train_tiny_tokenizer(["one two three 123 + 45 = 168"] * 5, vocab_size=300))
    s = "three + 123 = 45"
    assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("<|im_end|>")) == 1


def test_refuses_other_model_types_and_features():
    with pytest.raises(ValueError, match="not a Qwen2"):
        M.ModelConfig.from_hf(hf_config_dict(model_type="llama", architectures=["LlamaForCausalLM"]))
    good = hf_config_dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, rope_theta=1e4)
    assert M.ModelConfig.from_hf(good).head_dim == 4
    with pytest.raises(ValueError, match="sliding"):
        M.ModelConfig.from_hf({**good, "use_sliding_window": True})
    with pytest.raises(ValueError, match="rope scaling"):
        M.ModelConfig.from_hf({**good, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def _save(folder, state, cfg):
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_bad_checkpoints_name_the_tensor(tmp_path):
    hf = make_hf_model("untied")
    cfg = json.loads(hf.config.to_json_string())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    missing = dict(state)
    del missing["model.layers.1.mlp.up_proj.weight"]
    _save(tmp_path / "a", missing, cfg)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        M.from_pretrained(str(tmp_path / "a"))
    wrong = dict(state)
    wrong["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    _save(tmp_path / "b", wrong, cfg)
    with pytest.raises(ValueError, match=r"k_proj\.weight.*shape"):
        M.from_pretrained(str(tmp_path / "b"))
    extra = dict(state, **{"model.layers.0.extra.weight": torch.zeros(2)})
    _save(tmp_path / "c", extra, cfg)
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        M.from_pretrained(str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        os.makedirs(tmp_path / "empty")
        M.from_pretrained(str(tmp_path / "empty"))


def test_prompt_longer_than_context_is_refused():
    m = M.Qwen2(M.ModelConfig(vocab_size=20, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    with pytest.raises(ValueError, match="exceeds the context"):
        M.generate(m, [[1] * 30], max_new_tokens=8, stop_ids=[0], pad_id=0)


def test_hub_ids_download_only_what_loading_needs(monkeypatch, tmp_path):
    import huggingface_hub
    hf = make_hf_model("tied")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    m = M.from_pretrained("Qwen/Qwen2.5-1.5B-Instruct")
    assert calls == [("Qwen/Qwen2.5-1.5B-Instruct", M.HUB_FILES)]
    assert "*.safetensors" in M.HUB_FILES and not any(p.endswith(".bin") for p in M.HUB_FILES)
    assert m.config.vocab_size == hf.config.vocab_size


def test_fast_sampling_paths_equal_the_plain_ones(hf_pair):
    """Prefill once + copy the cache into K rows == K separate prompts; merged LoRA == unmerged."""
    import lora as L
    _, folder = hf_pair
    ours = M.from_pretrained(folder)
    prompts = [[5, 9, 2, 7], [8, 4, 6]]
    a, ma = M.generate(ours, prompts, 10, stop_ids=[1], pad_id=0, num_samples=3, temperature=0.0)
    b, mb = M.generate(ours, [p for p in prompts for _ in range(3)], 10, stop_ids=[1], pad_id=0)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    L.apply_lora(ours, r=4)
    with torch.no_grad():
        for p in L.lora_parameters(ours):
            p.normal_(0, 0.2)
    plain = M.generate(ours, prompts, 10, stop_ids=[1], pad_id=0)
    with L.merged(ours):
        fast = M.generate(ours, prompts, 10, stop_ids=[1], pad_id=0)
    assert torch.equal(plain[0], fast[0])


def test_sampling_draws_from_the_softmax():
    """Inverse-CDF sampling: frequencies match softmax(logits / T), filtered tokens never appear."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    n = 40000
    g = torch.Generator().manual_seed(0)
    for temperature, top_k in ((1.0, None), (0.7, 4)):
        p = (logits / temperature).softmax(-1)
        if top_k:
            p[top_k:] = 0
            p /= p.sum()
        draws = M.sample_next(logits.repeat(n, 1), temperature, top_k, None, M.uniforms(n, g, "cpu"))
        freq = torch.bincount(draws, minlength=len(logits)).double() / n
        sigma = (p * (1 - p) / n).sqrt()
        assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
        if top_k:
            assert freq[top_k:].sum() == 0


def test_noise_rows_give_each_row_its_single_process_draw():
    whole = M.uniforms(8, torch.Generator().manual_seed(3), "cpu")
    half = M.uniforms(4, torch.Generator().manual_seed(3), "cpu", noise_rows=(4, 8))
    assert whole.shape == (8, 1) and torch.equal(whole[4:], half)


def test_compiled_decode_step_equals_eager(hf_pair):
    """generate(compile=True): one graph without breaks (fullgraph), the same tokens as eager, and weights
    changed in place (merged LoRA) are read, not baked in."""
    import lora as L
    _, folder = hf_pair
    ours = M.from_pretrained(folder)
    L.apply_lora(ours, r=4)
    g = lambda: torch.Generator().manual_seed(5)
    for step, prompts in enumerate(([[5, 9, 2, 7], [8, 4, 6]], [[3, 1, 4, 1, 5, 9, 2], [6, 5]])):
        with torch.no_grad():
            for p in L.lora_parameters(ours):
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(step))
        with L.merged(ours):
            kw = dict(stop_ids=[1], pad_id=0, num_samples=3, temperature=1.0)
            eager = M.generate(ours, prompts, 12, generator=g(), **kw)
            compiled = M.generate(ours, prompts, 12, generator=g(), compile=True, **kw)
        assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
