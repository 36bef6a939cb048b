"""Pruning: the sparsity asked for, structured pruning equal to zeroing the removed parts, 2:4 pattern."""
import pytest
import torch

import llmopt
from llmopt import prune


@pytest.fixture
def model():
    return llmopt.build_model(llmopt.get_config("tiny"), seed=0)


def test_magnitude_prune_layer_and_global(model):
    masks = prune.magnitude_prune(model, 0.5, scope="layer")
    for name, m in prune.prunable(model):
        assert abs((m.weight == 0).float().mean().item() - 0.5) < 0.01, name
        assert torch.equal(masks[name] == 0, m.weight == 0)
    m2 = llmopt.build_model(llmopt.get_config("tiny"), seed=0)
    prune.magnitude_prune(m2, 0.7, scope="global")
    assert abs(prune.sparsity(m2) - 0.7) < 0.01
    assert model.lm_head.weight.ne(0).all()          # the output head is never pruned
    with pytest.raises(ValueError, match="amount must be in"):
        prune.magnitude_prune(model, 1.0)


def test_two_four_pattern(model):
    prune.semi_structured_2_4(model)
    for _, m in prune.prunable(model):
        zeros = (m.weight.reshape(-1, 4) == 0).sum(1)
        assert (zeros >= 2).all()
    assert abs(prune.sparsity(model) - 0.5) < 0.01


def test_removing_heads_equals_zeroing_them(model):
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    reference = llmopt.build_model(cfg, seed=0)
    prune.prune_heads(model, keep_kv_heads=2)
    assert model.config.n_kv_heads == 2 and model.config.n_heads == 4
    hd, rep = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    with torch.no_grad():
        for layer, ref_layer in zip(model.layers, reference.layers):
            # find which groups were kept by matching k_proj rows
            kept = [g for g in range(cfg.n_kv_heads)
                    if any(torch.equal(ref_layer.self_attn.k_proj.weight[g * hd:(g + 1) * hd],
                                       layer.self_attn.k_proj.weight[j * hd:(j + 1) * hd]) for j in range(2))]
            assert len(kept) == 2
            for g in range(cfg.n_kv_heads):
                if g not in kept:   # zero the group's query heads' contribution
                    ref_layer.self_attn.o_proj.weight[:, g * rep * hd:(g + 1) * rep * hd] = 0
        torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=1e-5)
    # the smaller model still generates through every cache, and its cache is smaller
    outs = {c: llmopt.generate(model, None, ids[0], max_new_tokens=6, cache=c, ignore_eos=True).token_ids
            for c in ("none", "static")}
    assert outs["none"] == outs["static"]
    assert llmopt.kv_bytes_per_token(model.config) == llmopt.kv_bytes_per_token(cfg) // 2


def test_removing_mlp_channels_equals_zeroing_them(model):
    ids = torch.randint(0, 4096, (1, 16))
    reference = llmopt.build_model(model.config, seed=0)
    prune.prune_mlp(model, keep_channels=384)
    assert model.config.intermediate_size == 384
    with torch.no_grad():
        for layer, ref_layer in zip(model.layers, reference.layers):
            same = (ref_layer.mlp.up_proj.weight[:, None] == layer.mlp.up_proj.weight[None]).all(-1)
            drop = torch.nonzero(~same.any(1)).flatten()                  # channels not kept
            assert len(drop) == 384
            ref_layer.mlp.down_proj.weight[:, drop] = 0
        torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == model.config.n_params


def test_recovery_keeps_pruned_weights_at_zero():
    model, tok = llmopt.load_model("tiny")
    masks = prune.magnitude_prune(model, 0.5)
    losses = prune.recover(model, tok, masks, steps=2, batch_size=2, seq_len=32)
    assert len(losses) == 2
    assert abs(prune.sparsity(model) - 0.5) < 0.01


def test_recovery_fine_tunes_a_transformers_model_and_refuses_another_models_tokenizer(hf_checkpoint):
    """`recover` (and `finetune` under it) train a transformers model too (its `.logits`); the ids of a
    tokenizer whose vocabulary the model lacks are a clear error, not an IndexError in the embedding."""
    from llmopt.tokenizer import Tokenizer
    _, folder, hf = hf_checkpoint
    masks = prune.magnitude_prune(hf, 0.5)
    before = {name: m.weight.detach().clone() for name, m in prune.prunable(hf)}
    losses = prune.recover(hf, Tokenizer.from_folder(folder), masks, steps=2, batch_size=2, seq_len=32)
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    for name, m in prune.prunable(hf):
        assert torch.equal(m.weight[masks[name] == 0], torch.zeros_like(m.weight[masks[name] == 0]))
        assert not torch.equal(m.weight, before[name])                 # the kept weights trained
    tiny_tok = llmopt.load_model("tiny")[1]                            # 4,096 tokens; this model has 512
    with pytest.raises(ValueError, match=r"finetune: token id \d+ is outside this model's vocabulary \[0, 512\)"):
        prune.recover(hf, tiny_tok, steps=1)
    with pytest.raises(ValueError, match=r"perplexity: token id 4000 is outside this model's vocabulary"):
        llmopt.metrics.perplexity(hf, ids=[1, 2, 4000])
    with pytest.raises(ValueError, match=r"compare_next_token: token id -1 is outside"):
        llmopt.metrics.compare_next_token(hf, hf, [1, 2, -1])


def test_structured_pruning_and_fusing_say_they_need_an_llmopt_model(hf_checkpoint):
    _, _, hf = hf_checkpoint
    for fn in (lambda m: prune.prune_heads(m, 1), lambda m: prune.prune_mlp(m, 8),
               llmopt.fuse_projections, llmopt.unfuse_projections):
        with pytest.raises(TypeError, match="runs llmopt models.*from_transformers"):
            fn(hf)


def test_gpt2_conv1d_layers_prune_too(gpt2):
    """transformers' Conv1D keeps its weight as [in, out]: magnitude pruning counts it, and 2:4 groups
    run along the input dimension as for nn.Linear, the mask in the layer's own layout."""
    import copy
    mag = copy.deepcopy(gpt2)
    prune.magnitude_prune(mag, 0.5)
    assert abs(prune.sparsity(mag) - 0.5) < 0.01 and len(prune.prunable(mag)) == 8
    masks = prune.semi_structured_2_4(gpt2)
    for name, m in prune.prunable(gpt2):
        assert torch.equal(masks[name] == 0, m.weight == 0)
        zeros = (m.weight.t().reshape(-1, 4) == 0).sum(1)     # [out, in]: consecutive inputs
        assert (zeros >= 2).all(), name
    with pytest.raises(ValueError, match="no linear layers to prune"):
        prune.magnitude_prune(torch.nn.Sequential(torch.nn.ReLU()), 0.5)


def test_structured_pruning_builds_its_indices_on_the_models_device():
    # a model on the meta device stands in for a GPU here: an index made on the CPU fails the same way
    # (notebook 07 on an H100, 2026-11-28: "found at least two devices, cuda:0 and cpu")
    meta = llmopt.build_model(llmopt.get_config("tiny"), device="meta")
    prune.prune_mlp(prune.prune_heads(meta, 1), 64)
    assert meta.config.n_kv_heads == 1 and meta.layers[0].mlp.gate_proj.weight.shape[0] == 64
    assert all(p.device.type == "meta" for p in meta.parameters())
