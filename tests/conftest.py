"""Shared fixtures: random-weight Hugging Face checkpoints built with transformers itself."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("LLMOPT_CI", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU, Triton kernels (llmopt.kernels) run in Triton's CPU interpreter. It must be on
# before anything imports Triton: the library's own helpers (tl.sum) are made then, interpreted or not.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One small config per supported family, each exercising a different feature.
FAMILIES = {
    # grouped-query attention, tied embeddings, Llama 3 rope scaling
    "llama": dict(cls="LlamaConfig", kwargs=dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # q/k/v bias, grouped-query attention, untied
    "qwen2": dict(cls="Qwen2Config", kwargs=dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
        use_sliding_window=False)),
    # Mistral: multi-head (no GQA), linear rope scaling off, untied
    "mistral": dict(cls="MistralConfig", kwargs=dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        sliding_window=None)),
}


@pytest.fixture(scope="session")
def small_tokenizer_dir(tmp_path_factory):
    """A 512-token byte-level BPE tokenizer trained on a little held-out text."""
    from llmopt.data import load_split
    from llmopt.tokenizer import save_tokenizer, train_tokenizer
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(load_split("validation")[:1], vocab_size=512), folder)
    return folder


def make_hf_checkpoint(family: str, folder, tokenizer_dir, seed: int = 0):
    """Build a random-weight transformers model of `family`, save it (safetensors) to `folder`."""
    import shutil
    import transformers
    spec = FAMILIES[family]
    config = getattr(transformers, spec["cls"])(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0,
        **spec["kwargs"])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if family == "qwen2":  # biases start at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.1)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return model


@pytest.fixture
def gpt2():
    """A random-weight GPT-2 (an architecture llmopt does not implement; its projections are Conv1D)."""
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(params=list(FAMILIES))
def hf_checkpoint(request, tmp_path, small_tokenizer_dir):
    """(family, folder, transformers model) for each supported family."""
    model = make_hf_checkpoint(request.param, tmp_path, small_tokenizer_dir)
    return request.param, tmp_path, model


class EosAt:
    """A tokenizer whose end-of-sequence token is `eos`, to end a generation mid-way."""

    def __init__(self, tok, eos):
        self.tok, self.eos_token_ids = tok, [eos]

    def encode(self, text):
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)
