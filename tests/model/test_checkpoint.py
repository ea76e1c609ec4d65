"""LongLLaVA-layout checkpoints: real safetensors files on disk, saved and reloaded."""

import json
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors import safe_open

from model import CheckpointError, LongLLaVA, load_checkpoint, save_checkpoint
from model.default import DEFAULT_CONFIG
from model.prompt import Image, Text, render_pieces, user_message
from model.tokenizer import ByteTokenizer, tokenize_prompt

TINY = DEFAULT_CONFIG.model_copy(  # attention at layer 4, as in LongLLaVA-9B's files
    update=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=9, num_attention_heads=4, mamba_dt_rank=8,
                attn_layer_offset=4)
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LongLLaVA(TINY).eval()


def logits_for(model, seed=0):
    image = np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    text, images = render_pieces(user_message([Image(image), Text("what is this?")]))
    ids = tokenize_prompt(ByteTokenizer(), text)
    with torch.no_grad():
        return model.llm.prefill(model.new_state(), model.embed(ids, model.encode_images(images)), logits="all")


@pytest.mark.parametrize("shard_bytes", [200_000, 10**9], ids=["sharded", "single file"])
def test_save_reload_gives_identical_outputs(model, tmp_path, shard_bytes):
    save_checkpoint(model, tmp_path, max_shard_bytes=shard_bytes)
    loaded = load_checkpoint(tmp_path).eval()
    assert torch.equal(logits_for(loaded), logits_for(model))
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_files_use_longllava_names(model, tmp_path):
    save_checkpoint(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all(name.startswith("model-000") for name in shards)
    keys = set(index["weight_map"])
    assert {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.final_layernorm.weight",
        "model.layers.0.mamba.A_log",
        "model.layers.0.mamba.B_layernorm.weight",
        "model.layers.0.moe.experts.0.gate_proj.weight",
        "model.layers.1.moe.router.weight",
        "model.layers.1.moe.experts.3.down_proj.weight",
        "model.layers.1.pre_moe_layernorm.weight",
        "model.layers.4.self_attn.q_proj.weight",
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
    } <= keys
    assert not any("router" in k for k in keys if k.startswith("model.layers.0."))  # dense: no router
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mm_vision_tower"] == "vision_tower" and (tmp_path / "vision_tower" / "config.json").exists()
    with safe_open(str(tmp_path / sorted(shards)[0]), "pt") as f:  # a real safetensors file
        assert len(list(f.keys())) > 0


def test_tower_from_another_directory_and_ignored_tower_keys(model, tmp_path):
    save_checkpoint(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "vision_tower").rename(tmp_path / "clip")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", vision_tower_path=tmp_path / "clip")
    assert torch.equal(logits_for(loaded), logits_for(model))


def test_broken_checkpoints_are_refused(model, tmp_path):
    save_checkpoint(model, tmp_path, max_shard_bytes=200_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]

    data = (tmp_path / first).read_bytes()
    (tmp_path / first).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / first).write_bytes(data)

    evil = dict(index, weight_map={**index["weight_map"], "model.embed_tokens.weight": "../../etc/passwd"})
    index_path.write_text(json.dumps(evil))
    with pytest.raises(CheckpointError, match="plain file name"):
        load_checkpoint(tmp_path)
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_checkpoint(tmp_path)
    index_path.write_text(json.dumps(index))

    (tmp_path / first).rename(tmp_path / "moved.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "moved.safetensors").rename(tmp_path / first)

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, attn_layer_offset=9)))
    with pytest.raises(CheckpointError, match="not a valid LongLLaVA config"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_missing_and_foreign_parameters_are_named(model, tmp_path):
    from safetensors.torch import save_file

    save_checkpoint(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing, e.g. \\['llm.lm_head.weight'\\]"):
        load_checkpoint(tmp_path)
    save_file({**tensors, "model.layers.0.mamba.extra": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.0.mamba.extra"):
        load_checkpoint(tmp_path)
    # tower weights inside the checkpoint are ignored, as LongLLaVA ignores them
    save_file({**tensors, "model.vision_tower.vision_tower.x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert torch.equal(logits_for(load_checkpoint(tmp_path)), logits_for(model))


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(num_hidden_layers=100_000), r"num_hidden_layers: Input should be less than or equal to 1024 \(got 100000\)"),
        (dict(num_hidden_layers=1000), r"config.json says 1000 layers, but the weights hold 9 \(numbered 0 to 8\)"),
        (dict(num_hidden_layers=8), r"config.json says 8 layers, but the weights hold 9"),
        (dict(num_experts=16, num_experts_per_tok=2), r"config.json gives layer 1 16 experts, but the weights hold 4"),
        (dict(expert_layer_offset=0), r"config.json gives layer 0 4 experts, but the weights hold 1"),
    ],
)
def test_a_config_that_cannot_match_its_weights_fails_before_a_model_is_built(model, tmp_path, edit, match):
    """100000 layers took 225 s and 8.4 GB before the missing-parameter error; 1000 took seconds."""
    save_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | edit))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20  # no layers built, no tensors read


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path):
    """With ``tie_word_embeddings`` the head is the embedding: Hugging Face writes it once
    (no ``lm_head.weight``), and after loading, training one must still move the other."""
    torch.manual_seed(0)
    tied = LongLLaVA(TINY.model_copy(update=dict(tie_word_embeddings=True))).eval()
    save_checkpoint(tied, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = load_checkpoint(tmp_path).eval()
    assert loaded.llm.lm_head.weight is loaded.llm.embed_tokens.weight
    assert torch.equal(logits_for(loaded), logits_for(tied))
    # a writer that kept a copy of the tied head (some do) is read the same way
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, str(tmp_path / "model.safetensors"))
    assert torch.equal(logits_for(load_checkpoint(tmp_path).eval()), logits_for(tied))
