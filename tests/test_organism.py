"""organism.py: the problem generator, and a (very small) organism's build, cache and loading."""

import json
import os
import re

import pytest

import evaluate
import gsm8k
import model as M
import organism

SMALL = organism.Recipe(n_train=64, n_test=16, layers=2, hidden=32, intermediate=64, sft_steps=3, batch=4,
                        vocab_size=300)


def test_problems_deterministic_and_disjoint():
    a_train, a_test = organism.problems(SMALL)
    b_train, b_test = organism.problems(SMALL)
    assert [e.solution for e in a_train + a_test] == [e.solution for e in b_train + b_test]
    assert [e.question for e in a_train + a_test] == [e.question for e in b_train + b_test]
    assert len(a_train) == 64 and len(a_test) == 16
    assert not {e.question for e in a_train} & {e.question for e in a_test}
    assert len({e.question for e in a_train}) == 64  # deduplicated
    other, _ = organism.problems(organism.Recipe(**{**SMALL.__dict__, "seed": 1}))
    assert [e.question for e in other] != [e.question for e in a_train]


def test_solutions_compute_their_gold():
    train, test = organism.problems(organism.Recipe(n_train=300, n_test=100))
    for ex in train + test:
        steps = re.findall(r"<<(\d+)([-+*])(\d+)=(\d+)>>", ex.solution)
        assert 2 <= len(steps) <= 3, ex.solution
        for a, op, b, c in steps:
            assert eval(f"{a}{op}{b}") == int(c) >= 0
        assert ex.gold == int(steps[-1][3]) == gsm8k.parse_gold(ex.solution)
        assert any(int(x) >= 10 for x in re.findall(r"\d+", ex.question))  # beyond one digit


def test_build_is_deterministic_cached_and_loads(tmp_path):
    one = organism.build(SMALL, str(tmp_path / "a"), log=lambda s: None)
    two = organism.build(SMALL, str(tmp_path / "b"), log=lambda s: None)
    assert os.path.basename(one) == os.path.basename(two) == f"organism-{SMALL.key()}"
    with open(os.path.join(one, "model.safetensors"), "rb") as f, \
            open(os.path.join(two, "model.safetensors"), "rb") as g:
        assert f.read() == g.read()
    assert not os.path.exists(one + ".tmp")
    stamp = os.stat(os.path.join(one, "model.safetensors")).st_mtime_ns
    built = []
    assert organism.build(SMALL, str(tmp_path / "a"), log=built.append) == one
    assert not built and os.stat(os.path.join(one, "model.safetensors")).st_mtime_ns == stamp  # found, not rebuilt
    model, tok = M.from_pretrained(one, device="cpu"), M.load_tokenizer(one)
    assert model.config.num_hidden_layers == 2
    train = gsm8k.load_gsm8k("train", one, verify=False)
    test = gsm8k.load_gsm8k("test", one, verify=False)
    assert len(train) == 64 and len(test) == 16
    assert [e.gold for e in test] == [e.gold for e in organism.problems(SMALL)[1]]
    records = evaluate.evaluate(model, tok, test[:4], max_new_tokens=8, batch_size=4)
    assert len(records) == 4


def test_recipe_key_changes_with_the_recipe():
    assert SMALL.key() != organism.Recipe(**{**SMALL.__dict__, "sft_steps": 4}).key()


def test_stops_early_answers_the_previous_line():
    ex = organism.problems(SMALL)[0][0]
    early = organism.stops_early(ex)
    results = [int(c) for c in re.findall(r"=(\d+)>>", ex.solution)]
    assert early.gold == results[-2] and early.question == ex.question
    assert early.solution.rsplit("####", 1)[0] == ex.solution.rsplit("####", 1)[0]


@pytest.mark.slow
def test_grpo_raises_the_reward_of_a_small_organism(tmp_path):
    """A 2-layer organism on small numbers (two operations on 2..5), with the planted early-answer habit,
    then 40 GRPO steps through train.py's real entry point: the mean reward of the last 10 steps beats
    the first 10 by 0.05. Measured on training seeds 0, 1, 2 (first 5 vs last 5 steps): 0.93 -> 1.15,
    1.00 -> 1.11, 0.96 -> 1.06, the correctness reward carrying the rise (0.43 -> 0.66 on seed 0)."""
    import json
    import subprocess
    import sys
    from conftest import ROOT
    recipe = organism.Recipe(n_train=400, n_test=40, lo=2, hi=5, max_ops=2, layers=2, hidden=64, intermediate=128,
                             sft_steps=600, batch=16, tie_embeddings=True, embed_std=None)
    folder = organism.build(recipe, str(tmp_path / "cache"), log=lambda s: None)
    flags = ["--model", folder, "--data", folder, "--data-unverified", "--device", "cpu", "--threads", "1",
             "--steps", "40", "--prompts-per-step", "8", "--num-generations", "8", "--max-new-tokens", "64",
             "--rank", "8", "--alpha", "16", "--lr", "2e-3", "--warmup-steps", "2", "--lr-schedule", "constant",
             "--beta", "0", "--micro-batch", "32", "--eval-n", "8", "--eval-max-new-tokens", "64",
             "--checkpoint-every", "100", "--out", str(tmp_path / "run")]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    reward = [json.loads(line)["reward"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    first, last = sum(reward[:10]) / 10, sum(reward[-10:]) / 10
    assert last > first + 0.05, (first, last, reward)


def test_untied_embeddings_set_the_residual_scale_at_layer_0(tmp_path):
    """embed_std draws the untied embedding at that scale: the residual stream entering layer 0 has RMS
    ~ embed_std (measured by residual_rms), where the tied default leaves it at init_std. A tied
    recipe with embed_std is refused (the lm_head would share the scale)."""
    untied = organism.Recipe(**{**SMALL.__dict__, "sft_steps": 1, "tie_embeddings": False, "embed_std": 2.0})
    tied = organism.Recipe(**{**SMALL.__dict__, "sft_steps": 1, "tie_embeddings": True, "embed_std": None})
    rms = {}
    for name, recipe in (("untied", untied), ("tied", tied)):
        folder = organism.build(recipe, str(tmp_path / name), log=lambda s: None)
        model, tok = M.from_pretrained(folder, device="cpu"), M.load_tokenizer(folder)
        assert model.config.tie_word_embeddings == (name == "tied")
        rms[name] = organism.residual_rms(model, tok, organism.problems(recipe)[1][:4])
        assert len(rms[name]) == recipe.layers + 1  # each layer's input, then the final norm's
    assert 1.8 < rms["untied"][0] < 2.2 and 0.04 < rms["tied"][0] < 0.06
    with pytest.raises(ValueError, match="embed_std needs tie_embeddings=False"):
        organism.Recipe(**{**SMALL.__dict__, "embed_std": 2.0, "tie_embeddings": True})
    with pytest.raises(ValueError, match="must divide by heads"):
        organism.Recipe(heads=5)


def test_the_command_line_takes_the_recipe_booleans(tmp_path, capsys):
    organism.main(["--root", str(tmp_path), "--n-train", "32", "--n-test", "8", "--layers", "1", "--hidden", "32",
                   "--intermediate", "64", "--sft-steps", "1", "--batch", "2", "--vocab-size", "300",
                   "--no-tie-embeddings", "--embed-std", "1.5"])
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    recipe = json.load(open(os.path.join(folder, "recipe.json")))
    assert recipe["tie_embeddings"] is False and recipe["embed_std"] == 1.5
    organism.main(["--root", str(tmp_path), "--n-train", "32", "--n-test", "8", "--layers", "1", "--hidden", "32",
                   "--intermediate", "64", "--sft-steps", "1", "--batch", "2", "--vocab-size", "300",
                   "--tie-embeddings", "--embed-std", "none"])
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    recipe = json.load(open(os.path.join(folder, "recipe.json")))
    assert recipe["tie_embeddings"] is True and recipe["embed_std"] is None
    with pytest.raises(SystemExit, match="error: Recipe: embed_std needs tie_embeddings=False"):
        organism.main(["--root", str(tmp_path), "--tie-embeddings"])


def test_two_builds_at_once_share_one_result_and_a_damaged_cache_is_named(tmp_path):
    """Two processes building one recipe into one empty cache: one builds, the other waits and uses its
    folder (no error, nothing temporary left). A truncated model.safetensors is then refused with the
    folder to delete, and a recipe that cannot build is refused before anything is written."""
    import subprocess
    import sys
    from conftest import ROOT
    flags = ["--root", str(tmp_path), "--n-train", "64", "--n-test", "16", "--layers", "2", "--hidden", "32",
             "--intermediate", "64", "--sft-steps", "30", "--batch", "4", "--vocab-size", "300"]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "organism.py"), *flags], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(folders) == 1 and sum("building" in err for _, err in outs) == 1
    folder = folders.pop()
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(folder), os.path.basename(folder) + ".lock"])
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "organism.py"), *flags], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and p.stderr.strip() == (
        f"error: {folder}: the cached organism is damaged (model.safetensors differs from manifest.json); delete "
        f"this folder and run again to rebuild it")
    with pytest.raises(ValueError, match="sft_steps=-5: must be >= 1"):
        organism.Recipe(sft_steps=-5)


def test_a_cache_built_before_manifests_is_checked_then_trusted(tmp_path):
    folder = organism.build(SMALL, str(tmp_path), log=lambda s: None)
    os.remove(os.path.join(folder, organism.MANIFEST))
    assert organism.verified(folder) is None and os.path.isfile(os.path.join(folder, organism.MANIFEST))
    os.remove(os.path.join(folder, organism.MANIFEST))
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    assert "model.safetensors does not open" in organism.verified(folder)
