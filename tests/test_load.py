"""Loading: safetensors only, clear errors for everything we cannot or will not load."""
import json
import shutil

import pytest
import torch

import llmopt
from llmopt.config import ModelConfig, get_config


def test_round_trip_save_and_load(hf_checkpoint, tmp_path_factory):
    family, folder, _ = hf_checkpoint
    model, tok = llmopt.load_model(folder)
    out = tmp_path_factory.mktemp("resaved")
    llmopt.save_model(model, out)
    for f in folder.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    again, _ = llmopt.load_model(out)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), again(ids), atol=0, rtol=0)
    assert again.config.architecture == model.config.architecture


def test_saved_folder_loads_in_transformers(hf_checkpoint, tmp_path_factory):
    """What llmopt writes, transformers reads unchanged, with the same logits."""
    from transformers import AutoModelForCausalLM
    family, folder, _ = hf_checkpoint
    model, _ = llmopt.load_model(folder)
    out = tmp_path_factory.mktemp("for_hf")
    llmopt.save_model(model, out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(40)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_load_in_bf16(hf_checkpoint):
    _, folder, _ = hf_checkpoint
    model, _ = llmopt.load_model(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32


def test_pickled_weights_are_refused(hf_checkpoint):
    _, folder, hf_model = hf_checkpoint
    (folder / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled weights are refused"):
        llmopt.load_model(folder)


def test_unsupported_architecture(hf_checkpoint):
    _, folder, _ = hf_checkpoint
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        llmopt.load_model(folder)


def test_mismatched_weights(hf_checkpoint):
    _, folder, _ = hf_checkpoint
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing .*layers.2"):
        llmopt.load_model(folder)
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 2, 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json and weights disagree"):
        llmopt.load_model(folder)


def test_missing_folder_and_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        llmopt.load_model("./nowhere/at/all")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        llmopt.load_model(tmp_path)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="n_heads .* multiple of n_kv_heads"):
        ModelConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_config("huge")
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig(architecture="FalconForCausalLM")
    tiny = get_config("tiny")
    # bitsandbytes 4-bit on CPU needs every linear dimension to be a multiple of 32
    for dim in (tiny.dim, tiny.intermediate_size, tiny.n_heads * tiny.head_dim,
                tiny.n_kv_heads * tiny.head_dim):
        assert dim % 32 == 0
    model = llmopt.build_model(tiny)
    assert sum(p.numel() for p in model.parameters()) == tiny.n_params
    big = get_config("llama-3.2-1b")
    assert 1.2e9 < big.n_params < 1.3e9  # Llama-3.2-1B has 1.24B parameters
