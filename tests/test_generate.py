"""generate.py: sampling against transformers' generate and against its own plain paths (tiny random models)."""

import pytest
import torch

import generate as G
import model as M


def test_greedy_generate_equals_transformers(hf_pair):
    hf, folder = hf_pair
    ours = M.from_pretrained(folder)
    prompts = [[5, 9, 2, 7, 11, 3], [8, 4, 6]]
    stop, pad = 1, 0  # eos_token_id=1 in the tiny config
    out, mask, _ = G.generate(ours, prompts, max_new_tokens=12, stop_ids=[stop], pad_id=pad)
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
    runs = [G.generate(ours, prompts, max_new_tokens=20, stop_ids=[1, 2], pad_id=0, num_samples=4, temperature=1.5,
                       top_k=50, top_p=0.95, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    (a, ma, la), (b, mb, lb) = runs
    assert a.shape[0] == 8 and torch.equal(a, b) and torch.equal(ma, mb) and torch.equal(la, lb)
    for row, m in zip(a, ma):
        stops = [t for t, x in enumerate(row.tolist()) if x in (1, 2)]
        n = int(m.sum())
        if stops:
            assert n == stops[0] + 1 and (row[n:] == 0).all()  # pad after the first stop
        else:
            assert n == row.shape[0]
        assert m[:n].all()
        assert (la[ma == 0] == 0).all() and (la[ma == 1] <= 0).all()  # log-probs of real tokens only


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    u = G.uniforms(len(logits), g, "cpu")
    assert set(G.sample_next(logits, 1.0, 2, None, u).tolist()) == {0, 1}
    # p = softmax ~ [.64, .24, .09, .03, .01]: top_p 0.8 keeps the first two only
    assert set(G.sample_next(logits, 1.0, None, 0.8, u).tolist()) == {0, 1}
    assert set(G.sample_next(logits, 0.0, None, None, None).tolist()) == {0}


def test_prompt_longer_than_context_is_refused():
    m = M.Qwen2(M.ModelConfig(vocab_size=20, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    with pytest.raises(ValueError, match="exceeds the context"):
        G.generate(m, [[1] * 30], max_new_tokens=8, stop_ids=[0], pad_id=0)


def test_fast_sampling_paths_equal_the_plain_ones(hf_pair):
    """Prefill once + copy the cache into K rows == K separate prompts; merged LoRA == unmerged."""
    import lora as L
    _, folder = hf_pair
    ours = M.from_pretrained(folder)
    prompts = [[5, 9, 2, 7], [8, 4, 6]]
    a, ma, _ = G.generate(ours, prompts, max_new_tokens=10, stop_ids=[1], pad_id=0, num_samples=3, temperature=0.0)
    b, mb, _ = G.generate(ours, [p for p in prompts for _ in range(3)], max_new_tokens=10, stop_ids=[1], pad_id=0)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    L.apply_lora(ours, r=4)
    with torch.no_grad():
        for p in L.lora_parameters(ours):
            p.normal_(0, 0.2)
    plain = G.generate(ours, prompts, max_new_tokens=10, stop_ids=[1], pad_id=0)
    with L.merged(ours):
        fast = G.generate(ours, prompts, max_new_tokens=10, stop_ids=[1], pad_id=0)
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
        draws = G.sample_next(logits.repeat(n, 1), temperature, top_k, None, G.uniforms(n, g, "cpu"))
        freq = torch.bincount(draws, minlength=len(logits)).double() / n
        sigma = (p * (1 - p) / n).sqrt()
        assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
        if top_k:
            assert freq[top_k:].sum() == 0


def test_noise_rows_give_each_row_its_single_process_draw():
    whole = G.uniforms(8, torch.Generator().manual_seed(3), "cpu")
    half = G.uniforms(4, torch.Generator().manual_seed(3), "cpu", noise_rows=(4, 8))
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
            eager = G.generate(ours, prompts, max_new_tokens=12, generator=g(), **kw)
            compiled = G.generate(ours, prompts, max_new_tokens=12, generator=g(), compile=True, **kw)
        assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
        assert torch.allclose(eager[2], compiled[2], atol=1e-5)


def test_compiled_calls_with_other_settings_get_their_own_graph(hf_pair):
    """Only a call's first compiled step checks dynamo's guards; the later steps must still run the graph
    of their own settings. Alternating sampling settings and batch sizes must each match eager."""
    _, folder = hf_pair
    ours = M.from_pretrained(folder)
    g = lambda: torch.Generator().manual_seed(7)
    settings = [dict(temperature=1.0, num_samples=3), dict(temperature=0.0, num_samples=3),
                dict(temperature=1.0, top_k=3, num_samples=2), dict(temperature=1.0, num_samples=3)]
    for kw in settings:
        common = dict(max_new_tokens=10, stop_ids=[1], pad_id=0, **kw)
        eager = G.generate(ours, [[5, 9, 2, 7], [8, 4, 6]], generator=g(), **common)
        compiled = G.generate(ours, [[5, 9, 2, 7], [8, 4, 6]], generator=g(), compile=True, **common)
        assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1]), kw


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampler_logprobs_are_the_tokens_log_softmax_at_the_temperature(hf_pair, temperature):
    """Each drawn token's log-prob is log softmax(logits / T) of a full forward over the sequence: what the
    learner computes (logprobs.completion_logprobs), so the two policies can be compared token for token."""
    _, folder = hf_pair
    ours = M.from_pretrained(folder)
    prompts = [[5, 9, 2, 7], [8, 4, 6]]
    out, mask, logp = G.generate(ours, prompts, max_new_tokens=8, stop_ids=[1], pad_id=0, num_samples=2,
                                 temperature=temperature, generator=torch.Generator().manual_seed(3))
    for i in range(out.shape[0]):
        p = prompts[i // 2]
        n = int(mask[i].sum())
        ids = torch.tensor([p + out[i, :n].tolist()])
        full = (ours(ids)[0, len(p) - 1:-1].float() / temperature).log_softmax(-1)  # (n, V)
        expected = full.gather(-1, out[i, :n, None])[:, 0]
        assert torch.allclose(logp[i, :n], expected, atol=1e-5), (logp[i, :n], expected)


@pytest.mark.parametrize("compile", [False, True])
def test_samples_sharing_their_prompts_cache_see_only_their_own_tokens(hf_pair, compile):
    """K = 4 samples of prompts of different lengths share each prompt's keys (model.KVCache); each
    sample's log-probs are those transformers gives its own sequence alone, whether the others have
    finished or not, eager and compiled."""
    hf, folder = hf_pair
    ours = M.from_pretrained(folder)
    if compile:  # dynamo keeps 8 graphs of decode_step, and the tests before this one used them up
        torch._dynamo.reset()
    prompts = [[5, 9, 2, 7, 11, 3], [8, 4, 6]]
    out, mask, logp = G.generate(ours, prompts, max_new_tokens=10, stop_ids=[1, 2, 3], pad_id=0, num_samples=4,
                                 temperature=1.0, generator=torch.Generator().manual_seed(11), compile=compile)
    lengths = mask.sum(-1)
    assert lengths.min() < lengths.max()  # some samples finished while others went on
    for i in range(out.shape[0]):
        p, n = prompts[i // 4], int(lengths[i])
        with torch.no_grad():
            logits = hf(torch.tensor([p + out[i, :n].tolist()])).logits[0, len(p) - 1:-1]
        want = logits.log_softmax(-1).gather(-1, out[i, :n, None])[:, 0]
        assert torch.allclose(logp[i, :n], want, atol=1e-5), i


def test_one_token_prompts_are_prefilled_as_prompts():
    """A batch of one-token prompts is the prefill (B rows), not a decode step of K samples (B*K rows)."""
    ours = M.Qwen2(M.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    ours.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    out, mask, logp = G.generate(ours, [[5], [9]], max_new_tokens=4, stop_ids=[1], pad_id=0, num_samples=3,
                                 temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert out.shape[0] == 6  # 2 prompts x 3 samples
    for i in range(6):
        n = int(mask[i].sum())
        with torch.no_grad():
            full = ours(torch.tensor([[(5, 9)[i // 3]] + out[i, :n].tolist()]))[0, :-1].log_softmax(-1)
        assert torch.allclose(logp[i, :n], full.gather(-1, out[i, :n, None])[:, 0], atol=1e-5)


@pytest.mark.parametrize("temperature, noise_rows, every", [(1.0, None, 1), (1.0, (12, 36), 3), (0.0, None, 1)])
def test_prompts_whose_samples_all_stopped_leave_the_batch(temperature, noise_rows, every):
    """Eager decoding drops a prompt at the first check after its K samples have all stopped: later steps
    run on fewer rows, and every row gets the tokens, draws and log-probs it gets when nothing is dropped
    (a check only every 1000 tokens); sampled, as a slice of a data-parallel batch, and greedy."""
    ours = M.Qwen2(M.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    ours.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    prompts = [[5, 9, 2, 7], [8, 4], [3, 6, 10], [12, 13, 14, 15, 16]]
    rows = []
    hook = ours.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    kw = dict(max_new_tokens=40, stop_ids=[1, 2, 3, 4], pad_id=0, num_samples=3, temperature=temperature,
              noise_rows=noise_rows)
    dropped = G.generate(ours, prompts, generator=torch.Generator().manual_seed(2), stop_check_every=every, **kw)
    decoded_rows = rows[1:]  # after the prefill
    hook.remove()
    kept = G.generate(ours, prompts, generator=torch.Generator().manual_seed(2), stop_check_every=1000, **kw)
    T = dropped[0].shape[1]
    longest = dropped[1].sum(-1).view(4, 3).max(-1).values  # each prompt's longest sample
    leaves = -(-longest // every) * every  # the check after its last token, counted in tokens written
    # the decode step after token t runs the prompts not yet dropped, as soon as a check finds them done
    assert decoded_rows == [3 * int((leaves > t + 1).sum()) for t in range(T - 1)]
    assert decoded_rows[0] == 12 and len(set(decoded_rows)) > 2  # prompts left at several steps
    assert (kept[0][:, T:] == 0).all()  # pad where the other run had stopped
    assert torch.equal(dropped[0], kept[0][:, :T]) and torch.equal(dropped[1], kept[1][:, :T])
    assert torch.allclose(dropped[2], kept[2][:, :T], atol=1e-6)
