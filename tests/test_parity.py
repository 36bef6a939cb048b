"""llmopt's decoder matches transformers on the same checkpoint: logits and greedy tokens."""
import pytest
import torch

import llmopt
from llmopt.profiling import hf_generate


def test_logits_match_transformers(hf_checkpoint):
    family, folder, hf_model = hf_checkpoint
    model, _ = llmopt.load_model(folder)
    ids = torch.randint(0, 512, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf_model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_rope_scaling_changes_logits_beyond_original_context(hf_checkpoint):
    """Guard against a parity test that passes because scaling is ignored on both sides."""
    family, folder, hf_model = hf_checkpoint
    if family != "llama":
        pytest.skip("only the llama fixture uses rope scaling")
    model, _ = llmopt.load_model(folder)
    plain = llmopt.Transformer(model.config.replace(rope_scaling=None))
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.allclose(plain(ids), model(ids), atol=1e-4)


@pytest.mark.parametrize("cache", ["static", "dynamic", "paged", "none"])
def test_greedy_generation_matches_transformers(hf_checkpoint, cache):
    family, folder, hf_model = hf_checkpoint
    model, tok = llmopt.load_model(folder)
    prompt = "Friends, Romans, countrymen"
    ids = torch.tensor([tok.encode(prompt)])
    ours = llmopt.generate(model, tok, prompt, max_new_tokens=24, cache=cache, ignore_eos=True)
    theirs = hf_generate(hf_model, ids, max_new_tokens=24)
    assert ours.token_ids == theirs.token_ids
    assert ours.prompt_ids == ids[0].tolist()


def test_hf_generate_takes_one_prompts_ids_in_any_form_and_says_what_it_needs(hf_checkpoint):
    _, _, hf_model = hf_checkpoint
    ids = [5, 17, 42]
    want = hf_generate(hf_model, torch.tensor([ids]), max_new_tokens=4).token_ids
    assert hf_generate(hf_model, ids, max_new_tokens=4).token_ids == want
    assert hf_generate(hf_model, torch.tensor(ids), max_new_tokens=4).token_ids == want
    with pytest.raises(TypeError, match="encode the prompt first"):
        hf_generate(hf_model, "Friends, Romans", max_new_tokens=4)
    with pytest.raises(ValueError, match="one prompt"):
        hf_generate(hf_model, torch.tensor([ids, ids]), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        hf_generate(hf_model, ids, max_new_tokens=0)
