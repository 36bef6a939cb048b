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
    # a name, and an 8-bit cache's estimate, half bf16's
    assert llmopt.kv_bytes_per_token(cfg, "bf16") == 32768
    assert llmopt.kv_bytes_per_token(cfg, torch.int8) == llmopt.kv_bytes_per_token(cfg, torch.float8_e4m3fn) == 16384
    assert llmopt.kv_cache_bytes(cfg, 32, 4096, "bf16") == 32 * 4096 * 32768
    for args, message in [((0, 64), "batch_size must be an integer >= 1"), ((1, -5), "seq_len must be"),
                          ((1, 2.5), "seq_len must be")]:
        with pytest.raises(ValueError, match=message):
            llmopt.kv_cache_bytes(cfg, *args)
    with pytest.raises(ValueError, match="dtype must be one of"):
        llmopt.kv_bytes_per_token(cfg, "int3")


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


def test_kept_gathered_rows_equal_a_fresh_gather_every_step():
    """keep_gathered (the engine's default) returns exactly what gathering the blocks again
    returns, through rows joining and leaving, a block copied on write, growth past the kept
    width and a step that failed halfway; and it gathers only when the rows change."""
    cfg = llmopt.get_config("tiny")
    L, H, D = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    manager = BlockManager(num_blocks=64, block_size=16)
    caches = [PagedKVCache(cfg, 4, 512, manager=manager, keep_gathered=keep) for keep in (False, True)]
    gen = torch.Generator().manual_seed(0)
    rows: list[list[int]] = []      # blocks per running row
    lengths: list[int] = []         # tokens cached per row

    def forward(blocks, lens, new_tokens=1, layers=L):
        """Both caches take the same keys/values; every position a row holds must agree."""
        S = [c.set_rows(blocks, lens, new_tokens) for c in caches]
        assert S[0] == S[1]
        B = len(blocks)
        for layer in range(layers):
            k, v = torch.randn(2, B, H, new_tokens, D, generator=gen)
            (k0, v0), (k1, v1) = [c.update(layer, None, k, v) for c in caches]
            for b, n in enumerate(lens):
                assert torch.equal(k0[b, :, :n + new_tokens], k1[b, :, :n + new_tokens])
                assert torch.equal(v0[b, :, :n + new_tokens], v1[b, :, :n + new_tokens])

    def admit(prompt_len):
        blocks = manager.allocate(manager.blocks_needed(prompt_len + 1))
        forward([blocks], [0], new_tokens=prompt_len)
        rows.append(blocks)
        lengths.append(prompt_len)

    def step(layers=L):
        for blocks, n in zip(rows, lengths):
            if manager.blocks_needed(n + 1) > len(blocks):
                blocks += manager.allocate(1)
        forward(rows, lengths, layers=layers)
        if layers == L:
            lengths[:] = [n + 1 for n in lengths]

    for p in (5, 30, 100):
        admit(p)
    kept = caches[1]
    for _ in range(10):
        step()
    assert kept.gathers == 1                      # gathered once, then extended 9 times
    manager.release(rows.pop(0)); lengths.pop(0)  # a row leaves, another joins
    admit(17)
    for _ in range(5):
        step()
    assert kept.gathers == 2
    new = manager.allocate(1)[0]                  # copy on write of row 0's first block
    for c in caches:
        c.copy_blocks([(rows[0][0], new)])
    rows[0][0] = new
    step()
    assert kept.gathers == 3
    for _ in range(30):                           # row 1 (100 + ...) outgrows 128 kept slots
        step()
    assert kept.gathers == 4 and max(lengths) > 128
    step(layers=1)                                # a forward that failed after one layer
    step()
    assert kept.gathers == 5
    kept.drop_gathered()
    step()
    assert kept.gathers == 6 and kept.gathered[0] is not None


def test_to_device_gives_the_values_on_the_device():
    from llmopt.kv_cache import to_device
    for device in [None, "cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        t = to_device([[3, 1], [4, 1]], device)
        assert t.dtype == torch.long and t.tolist() == [[3, 1], [4, 1]]
        assert t.device.type == ("cpu" if device is None else device)
    assert to_device([0.5], "cpu", torch.float32).dtype == torch.float32


def test_a_mixed_step_equals_a_decode_step_and_separate_prefills():
    """Decode rows and new prompts in one packed forward (`set_mixed`, attention split by group)
    give the logits and the cached keys/values of a decode step plus one prefill per prompt,
    including a prompt whose first block is already cached (a prefix-cache hit)."""
    cfg = llmopt.get_config("tiny")
    model = llmopt.build_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()   # noqa: E731
    running, new = [ids(21), ids(40)], [ids(7), ids(35)]       # prompts already cached / joining
    manager = BlockManager(num_blocks=32, block_size=16)
    caches = [PagedKVCache(cfg, 4, 256, manager=manager) for _ in range(2)]
    blocks = {c: [manager.allocate(manager.blocks_needed(len(p) + 1)) for p in running + new] for c in caches}
    with torch.no_grad():
        for c in caches:                  # the running rows' prompts, and the prefix of new[1]
            for b, p in zip(blocks[c], running + [[], new[1][:16]]):
                if p:
                    c.set_rows([b], [0], new_tokens=len(p))
                    model(torch.tensor([p]), torch.arange(len(p)), c)
        last = torch.tensor([[p[-1]] for p in running])         # the decode rows' next input
        lens = [len(p) for p in running]
        separate, mixed = caches
        # separate: one decode step, then each prompt alone
        S = separate.set_rows(blocks[separate][:2], lens)
        key_mask = torch.arange(S)[None] <= separate.row_lengths[:, None]
        want = [model(last, torch.tensor([S - 1]), separate, positions=separate.row_lengths[:, None],
                      key_mask=key_mask)[:, -1]]
        for b, p, start in zip(blocks[separate][2:], new, (0, 16)):
            separate.set_rows([b], [start], new_tokens=len(p) - start)
            want.append(model(torch.tensor([p[start:]]), torch.arange(start, len(p)), separate)[:, -1])
        # mixed: all in one forward
        pos = mixed.set_mixed(blocks[mixed][:2], lens, [(blocks[mixed][2], 0, 7), (blocks[mixed][3], 16, 19)])
        assert pos.tolist() == lens + list(range(7)) + list(range(16, 35))
        tokens = torch.tensor([last[0, 0], last[1, 0]] + new[0] + new[1][16:])[None]
        got = model(tokens, pos, mixed, positions=pos[None], logits_to_keep=torch.tensor([0, 1, 8, 27]))[0]
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)
    for layer in range(cfg.n_layers):        # the same keys and values landed in the same slots
        for b_sep, b_mix, n in zip(blocks[separate], blocks[mixed], [22, 41, 7, 35]):   # + the decoded token
            slots = lambda bl, c: c.kv[layer].view(32, 16, *c.kv[layer].shape[1:])[bl].flatten(0, 1)[:n]  # noqa: E731
            torch.testing.assert_close(slots(b_sep, separate), slots(b_mix, mixed), atol=1e-5, rtol=1e-5)
