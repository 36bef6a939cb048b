"""fuse_projections: q, k, v in one matmul and gate, up in another, computing the same model."""
import pytest
import torch

import llmopt
from llmopt.model import fuse_projections, is_fused, unfuse_projections
from llmopt.quantize import quantize

PROMPTS = ["ROMEO:", "To be, or not to be", "KING HENRY: Once more"]


@pytest.fixture()
def pair():
    model, tok = llmopt.load_model("tiny")
    fused, _ = llmopt.load_model("tiny")
    return model, fuse_projections(fused), tok


def test_fused_model_computes_the_same_logits_and_tokens(pair):
    model, fused, tok = pair
    assert is_fused(fused) and not is_fused(model)
    a = fused.layers[0].self_attn
    cfg = model.config
    assert a.qkv_proj.weight.shape == ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.dim)
    assert not hasattr(a, "q_proj") and fused.layers[0].mlp.gate_up_proj.out_features == 2 * cfg.intermediate_size
    ids = torch.tensor([tok.encode("ROMEO: what light through yonder window breaks")])
    torch.testing.assert_close(fused(ids), model(ids), rtol=1e-5, atol=1e-5)
    for prompt in PROMPTS:
        want = llmopt.generate(model, tok, prompt, max_new_tokens=24).token_ids
        assert llmopt.generate(fused, tok, prompt, max_new_tokens=24).token_ids == want
    # batched paths run the same attention: left-padded static batches and the paged engine
    want = [llmopt.generate(model, tok, p, max_new_tokens=16, ignore_eos=True).token_ids for p in PROMPTS]
    got = llmopt.generate_batch(fused, tok, PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [g.token_ids for g in got] == want
    with llmopt.Engine(fused, tok, max_batch_size=3) as engine:
        handles = [engine.submit(p, max_new_tokens=16, ignore_eos=True) for p in PROMPTS]
        assert [h.result(timeout=120).token_ids for h in handles] == want


def test_fusing_twice_is_a_no_op_and_unfusing_restores_the_weights(pair):
    model, fused, tok = pair
    before = {n: p.clone() for n, p in fused.named_parameters()}
    fuse_projections(fused)
    assert all(torch.equal(before[n], p) for n, p in fused.named_parameters())
    unfuse_projections(fused)
    assert not is_fused(fused)
    ref = dict(model.named_parameters())
    assert sorted(n for n, _ in fused.named_parameters()) == sorted(ref)
    assert all(torch.equal(p, ref[n]) for n, p in fused.named_parameters())


def test_quantizing_a_fused_model_quantizes_each_fused_linear_once(pair):
    model, fused, tok = pair
    quantize(model, "int8")
    quantize(fused, "int8")
    assert type(fused.layers[0].self_attn.qkv_proj).__name__ == "Int8Linear"
    # per-output-channel scales: the fused rows are quantized exactly as the separate ones
    q = model.layers[0].self_attn
    torch.testing.assert_close(fused.layers[0].self_attn.qkv_proj.weight,
                               torch.cat([q.q_proj.weight, q.k_proj.weight, q.v_proj.weight]))
    ids = torch.tensor([tok.encode("ROMEO: what light")])
    torch.testing.assert_close(fused(ids), model(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unfuse before quantizing"):
        unfuse_projections(fused)


def test_operations_that_need_the_usual_layout_say_so(pair, tmp_path):
    from llmopt.parallel import shard_model
    from llmopt.prune import prune_heads, prune_mlp
    model, fused, tok = pair
    for call in (lambda: llmopt.save_model(fused, tmp_path / "m"), lambda: llmopt.to_transformers(fused),
                 lambda: prune_heads(fused, 1), lambda: prune_mlp(fused, 64),
                 lambda: shard_model(fused, 0, 2)):
        with pytest.raises(ValueError, match="unfuse_projections"):
            call()
    quantize(model, "int8")
    with pytest.raises(ValueError, match="fuse before quantizing"):
        fuse_projections(model)
