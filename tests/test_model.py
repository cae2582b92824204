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
