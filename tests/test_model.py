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


def shared_batch(vocab, seed=4):
    """3 left-padded prompts, 4 completions of each (some stopped early), and the same as whole sequences."""
    g = torch.Generator().manual_seed(seed)
    prompts, ids = torch.randint(0, vocab, (3, 7), generator=g), torch.randint(0, vocab, (12, 5), generator=g)
    prompt_mask, mask = torch.ones_like(prompts), torch.ones_like(ids)
    prompt_mask[0, :3], prompt_mask[1, :1], mask[2, 3:], mask[5, 1:] = 0, 0, 0, 0
    rows = torch.arange(12) // 4
    return prompts, prompt_mask, rows, ids, mask, torch.cat([prompts[rows], ids], 1), torch.cat([prompt_mask[rows], mask], 1)


def test_shared_prompt_logprobs_match_transformers(hf_pair):
    """Completions continuing prompts run once each (SharedPrompts) get the log-probs transformers gives
    the whole left-padded sequences."""
    hf, folder = hf_pair
    ours = M.from_pretrained(folder)
    prompts, prompt_mask, rows, ids, mask, full, full_mask = shared_batch(hf.config.vocab_size)
    with torch.no_grad():
        logp, _ = M.completion_logprobs_shared(ours, prompts, prompt_mask, rows, ids, mask)
        logits = hf(full, attention_mask=full_mask).logits[:, -6:-1].float()
    want = torch.gather(logits.log_softmax(-1), 2, ids[..., None])[..., 0]
    assert ((logp - want).abs() * mask).max() <= TOL


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompts_give_the_whole_sequences_values_and_gradients(checkpointing):
    """Against completion_logprobs on the whole sequences, with LoRA and different ranks, with and without
    gradient checkpointing: log-probs and entropies within rounding (fp32: a few ulp), adapter gradients
    to 1e-5 of their size (the K rows' gradients are summed in another order)."""
    import lora as L
    cfg = M.ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = M.Qwen2(cfg)
    m.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    m.requires_grad_(False)
    L.apply_lora(m, r=4, alpha=8.0, rank_pattern={"model.layers.1.mlp.*": 2})
    with torch.no_grad():
        for p in L.lora_parameters(m):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    m.gradient_checkpointing = checkpointing
    m.train()
    prompts, prompt_mask, rows, ids, mask, full, full_mask = shared_batch(100)
    weight = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2)) * mask
    got = []
    for fn in (lambda: M.completion_logprobs(m, full, full_mask, 5, entropy=True),
               lambda: M.completion_logprobs_shared(m, prompts, prompt_mask, rows, ids, mask, entropy=True)):
        logp, ent = fn()
        (logp * weight).sum().backward()
        got.append((logp.detach(), ent, [p.grad.clone() for p in L.lora_parameters(m)]))
        m.zero_grad(set_to_none=True)
    (a, ea, ga), (b, eb, gb) = got
    real = mask.bool()
    assert torch.allclose(a[real], b[real], rtol=0, atol=2e-6) and torch.allclose(ea[real], eb[real], rtol=0, atol=2e-6)
    assert all((x - y).abs().max() <= 1e-5 * x.abs().max() for x, y in zip(ga, gb))
    assert all(x.abs().max() > 0 for x in ga)  # every adapter got a gradient: the comparison means something


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


def plain_logprobs(logits, targets, temperature):
    """The unchunked computation TokenLogProbs replaces: one fp32 copy of every logit, then cross_entropy."""
    x = logits[:, :-1].float() / temperature
    logp = -torch.nn.functional.cross_entropy(x.flatten(0, 1), targets.flatten(), reduction="none")
    lp = x.detach().log_softmax(-1)
    return logp.view_as(targets), -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_are_the_plain_ones_bit_for_bit(monkeypatch, dtype):
    """Values, entropy and gradients equal the unchunked computation exactly, in fp32 and from bf16
    logits, with chunks of 3 positions (so chunks split sequences) and at temperature 0.7."""
    from trl.trainer.utils import selective_log_softmax
    torch.manual_seed(0)
    logits = (torch.randn(3, 18, 500) * 3).to(dtype)
    targets, g = torch.randint(0, 500, (3, 17)), torch.randn(3, 17)
    monkeypatch.setattr(M, "LOGIT_CHUNK_BYTES", 3 * 4 * 500)

    class Head(torch.nn.Module):  # a "model" whose logits are the fixed tensor above
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(logits.clone())

        def forward(self, ids, attn, num_logits):
            return self.logits[:, -num_logits:]

    ids = torch.cat([torch.zeros(3, 5, dtype=torch.long), targets], 1)
    head, ref = Head(), logits.clone().requires_grad_()
    logp, ent = M.completion_logprobs(head, ids, None, 17, entropy=True, temperature=0.7)
    want_logp, want_ent = plain_logprobs(ref, targets, 0.7)
    (logp * g).sum().backward()
    (want_logp * g).sum().backward()
    assert logp.dtype == torch.float32 and head.logits.grad.dtype == dtype
    assert torch.equal(logp, want_logp) and torch.equal(ent, want_ent) and torch.equal(head.logits.grad, ref.grad)
    # TRL's selective_log_softmax, an independent implementation of the same quantity
    trl = selective_log_softmax(logits[:, :-1].float() / 0.7, targets)
    assert torch.allclose(logp, trl, atol=0, rtol=1e-6)


MEASURE = """
import sys, torch, model as M
def hwm():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
logits = torch.randn(4, 257, 32000, requires_grad=True)  # 132 MB in fp32
targets = torch.randint(0, 32000, (4, 256))
before = hwm()
open('/proc/self/clear_refs', 'w').write('5')
if sys.argv[1] == 'plain':
    x = logits[:, :-1].float()
    logp = -torch.nn.functional.cross_entropy(x.flatten(0, 1), targets.flatten(), reduction='none')
    with torch.no_grad():
        lp = x.log_softmax(-1); ent = -(lp.exp() * lp).sum(-1)
else:
    logp, ent = M.completion_logprobs(lambda ids, attn, num_logits: logits, targets, None, 256, entropy=True)
logp.sum().backward()
print(hwm() * 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-memory reset")
def test_chunked_logprobs_use_less_memory():
    """Peak resident memory of log-probs + entropy + backward on 4 x 256 x 32,000 logits (132 MB each
    in fp32): the plain computation holds several such tensors at once, the chunked one the logits, their
    gradient and a few 16 MiB chunks."""
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    peak = {w: int(subprocess.run([sys.executable, "-c", MEASURE, w], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=120, check=True).stdout) for w in ("plain", "chunked")}
    tensor = 4 * 256 * 32000 * 4
    assert peak["plain"] - peak["chunked"] > 2 * tensor, {k: v / 2**20 for k, v in peak.items()}
