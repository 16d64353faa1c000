"""Model training, checkpoints, HF loading, the TransformerLens bridge, and recall evaluation."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mechedit
from mechedit.errors import CheckpointError, SpecError
from mechedit.model.evaluate import evaluate_recall, score_answers
from mechedit.model.spec import PRESETS, TRAIN_PRESETS, model_spec, with_overrides
from mechedit.model.train import train_model
from mechedit.world.tokenizer import build_tokenizer


def test_checkpoint_loads_with_plain_hugging_face(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    b = mechedit.load(tiny_checkpoint)
    ids = tok("the capital of", return_tensors="pt")["input_ids"]
    assert torch.equal(hf(ids).logits, b.model(ids).logits)
    meta = json.loads((tiny_checkpoint / "mechedit.json").read_text())
    for key in ("mechedit_version", "world_spec", "model_spec", "train_spec", "curve", "final_recall", "train_seconds"):
        assert key in meta
    assert meta["curve"] and "cloze_by_relation" in meta["curve"][-1]


def test_tiny_model_memorises_its_world(tiny_bundle):
    rec = tiny_bundle.meta["final_recall"]["trained"]["by_kind"]
    assert rec["cloze"] >= 0.99
    again = evaluate_recall(tiny_bundle.model, tiny_bundle.tokenizer, tiny_bundle.world)
    assert again["by_kind"] == pytest.approx(rec)
    # held-out subjects were never trained: recall near chance
    held = tiny_bundle.meta["final_recall"]["heldout_subjects"]["by_kind"]
    assert held["cloze"] < 0.7


def test_bridge_logits_equal_hf_logits(tiny_bundle):
    bridge = tiny_bundle.bridge()
    prompts = [p.prompt for p in tiny_bundle.world.probes()[:16]]
    for text in prompts:
        ids = tiny_bundle.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            diff = (bridge(ids) - tiny_bundle.model(ids).logits).abs().max()
        assert diff < 1e-4
    # the bridge works on a copy: the HF model is untouched and still saves
    assert type(tiny_bundle.model.gpt_neox.layers[0].mlp).__name__ == "GPTNeoXMLP"


def test_training_is_deterministic(tiny_world):
    tok = build_tokenizer(tiny_world)
    tspec = with_overrides(TRAIN_PRESETS["tiny"], max_epochs=3, eval_every=3)
    a = train_model(tiny_world, tok, PRESETS["tiny"], tspec)
    b = train_model(tiny_world, tok, PRESETS["tiny"], tspec)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    assert a.curve[-1]["loss"] == b.curve[-1]["loss"]


def test_score_answers_matches_direct_computation(tiny_bundle):
    w, tok, model = tiny_bundle.world, tiny_bundle.tokenizer, tiny_bundle.model
    probes = w.probes(w.train_facts[:5])
    s = score_answers(model, tok, [p.prompt for p in probes], [p.answer for p in probes], batch_size=3)
    for i, p in enumerate(probes):
        ids = tok(p.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, -1], -1)
        ans = tok.convert_tokens_to_ids(p.answer)
        assert s.logprob[i] == pytest.approx(float(logp[ans]), abs=1e-5)
        assert s.correct[i] == (int(logp.argmax()) == ans)


def test_missing_and_corrupt_checkpoints(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        mechedit.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing"):
        mechedit.load(tmp_path / "empty")
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        mechedit.load(bad)
    bad2 = tmp_path / "bad2"
    shutil.copytree(tiny_checkpoint, bad2)
    (bad2 / "world.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        mechedit.load(bad2)


def test_model_spec_files_and_presets(tmp_path):
    assert model_spec("pythia-31m-like")[0].n_layers == 6
    f = tmp_path / "m.toml"
    f.write_text('preset = "tiny"\n[model]\nn_layers = 3\n[train]\nlr = 0.001\n')
    m, t = model_spec(str(f))
    assert (m.n_layers, m.d_model, t.lr) == (3, 32, 0.001)
    f.write_text('[model]\nd_model = 30\nn_heads = 4\n')
    with pytest.raises(SpecError, match="divisible"):
        model_spec(str(f))
    with pytest.raises(SpecError, match="unknown model preset"):
        model_spec("huge")


def test_weights_hash_is_recorded_and_checked(tmp_path, tiny_checkpoint):
    import hashlib
    import shutil

    meta = json.loads((tiny_checkpoint / "mechedit.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256((tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert mechedit.load(tiny_checkpoint).meta["weights_verified"] is True
    flipped = tmp_path / "flipped"
    shutil.copytree(tiny_checkpoint, flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-100] ^= 1  # one bit of one weight: safetensors and HF would load it without complaint
    (flipped / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the weights_sha256"):
        mechedit.load(flipped)
    for broken in ({}, {k: v for k, v in meta.items() if k != "model_spec"}):
        partial = tmp_path / f"partial{len(broken)}"
        shutil.copytree(tiny_checkpoint, partial)
        (partial / "mechedit.json").write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match="lacks"):
            mechedit.load(partial)


def test_checkpoints_from_before_the_hash_still_load(tmp_path, tiny_checkpoint):
    """No weights_sha256 (written before it existed): the weights load unverified, and info says so."""
    import shutil

    from mechedit.model.pipeline import info

    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    meta = json.loads((old / "mechedit.json").read_text())
    del meta["weights_sha256"]
    (old / "mechedit.json").write_text(json.dumps(meta))
    assert mechedit.load(old).meta["weights_verified"] is False
    assert info(old)["weights"]["verified"] is False and "not verified" in info(old)["weights"]["note"]
    assert info(tiny_checkpoint)["weights"]["verified"] is True


def test_edited_and_unlearned_checkpoints_carry_their_own_hash(tmp_path, tiny_bundle, tiny_checkpoint):
    import hashlib

    from mechedit.edit.api import EditRequest
    from mechedit.edit.run import edit_checkpoint
    from mechedit.unlearn.run import unlearn_checkpoint

    w = tiny_bundle.world
    f = w.train_facts[0]
    new = next(o for o in w.relation(f.relation).objects if o != f.object)
    edit_checkpoint(tiny_checkpoint, [EditRequest(w.subjects[f.subject].name, f.relation, new)], "finetune",
                    {"steps": 2, "layer": 0}, tmp_path / "edited")
    unlearn_checkpoint(tiny_checkpoint, "ga", [f"subject:{w.subjects[f.subject].name}"], {"steps": 2},
                       tmp_path / "unlearned")
    original = json.loads((tiny_checkpoint / "mechedit.json").read_text())["weights_sha256"]
    for d in (tmp_path / "edited", tmp_path / "unlearned"):
        recorded = json.loads((d / "mechedit.json").read_text())["weights_sha256"]
        assert recorded == hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() != original
        assert mechedit.load(d).meta["weights_verified"] is True
