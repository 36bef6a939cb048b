"""KV caches: memory arithmetic matches what is allocated; the paged block manager's bookkeeping."""
import pytest
import torch

import llmopt
from llmopt.kv_cache import BlockManager, PagedKVCache


def test_kv_bytes_formula_and_gqa():
    cfg = llmopt.get_config("llama-3.2-1b")
    # 2 (k, v) x 16 layers x 8 kv heads x 64 head dim x 2 bytes = 32 KiB per token in bf16
    assert llmopt.kv_bytes_per_token(cfg, torch.bfloat16) == 32768
    mha = cfg.replace(n_kv_heads=cfg.n_heads)
    assert llmopt.kv_bytes_per_token(mha, torch.bfloat16) == 4 * 32768  # GQA saves 32/8 = 4x


@pytest.mark.parametrize("kind", ["static", "paged"])
def test_allocated_bytes_match_prediction(kind):
    cfg = llmopt.get_config("tiny")
    cache = llmopt.make_cache(kind, cfg, 2, 64, dtype=torch.bfloat16)
    assert cache.nbytes == llmopt.kv_cache_bytes(cfg, 2, 64, torch.bfloat16)


def test_block_manager_refcounts():
    m = BlockManager(num_blocks=4, block_size=16)
    a = m.allocate(3)
    assert a == [0, 1, 2] and m.num_free == 1
    m.share(a[:2])                        # a second user of the first two blocks
    m.release(a)
    assert m.num_free == 2                # block 2 back, blocks 0 and 1 still shared
    m.release(a[:2])
    assert m.num_free == 4
    with pytest.raises(ValueError, match="released more often"):
        m.release([0])
    with pytest.raises(MemoryError, match="out of blocks"):
        m.allocate(5)


def test_paged_cache_grows_a_block_at_a_time_and_frees():
    cfg = llmopt.get_config("tiny")
    cache = PagedKVCache(cfg, batch_size=1, max_len=100, block_size=16)
    model = llmopt.build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        llmopt.prefill(model, ids, cache)
    assert len(cache.blocks[0]) == 2                    # 20 tokens -> 2 blocks of 16
    assert cache.used_bytes == llmopt.kv_cache_bytes(cfg, 1, 32)
    cache.free()
    assert cache.manager.num_free == cache.manager.num_blocks
