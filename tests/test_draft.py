"""The MLP draft (`tiny-draft`): its step, its storage and its distillation from the target."""
import json

import pytest
import torch

import llmopt
from llmopt.draft import MLPDraft, MLPDraftConfig, agreement, main, target_labels
from llmopt.load import EMBEDDED


@pytest.fixture(scope="module")
def draft():
    return llmopt.load_model("tiny-draft")[0]


def test_contexts_pad_the_start_and_slide():
    d = MLPDraft(MLPDraftConfig(vocab_size=50, context=3, pad_token_id=0))
    ids = torch.tensor([7, 8, 9, 10])
    assert d.contexts(ids, torch.tensor([0, 1, 3])).tolist() == [[0, 0, 7], [0, 7, 8], [8, 9, 10]]


def test_propose_is_its_own_greedy_chain(draft):
    """k proposals = k greedy steps, each seeing the previous proposals (and padding at the start)."""
    tokens = [5, 17, 300, 42]
    chain = list(tokens)
    with torch.no_grad():
        for _ in range(5):
            ctx = draft.contexts(torch.tensor(chain), torch.tensor([len(chain) - 1]))
            chain.append(int(draft(ctx).argmax()))
    assert draft.propose(tokens, 5) == chain[len(tokens):]
    assert draft.propose(tokens, 0) == []
    assert draft.propose(list(range(1, 40)), 2) == draft.propose(list(range(32, 40)), 2)  # sees 8 tokens


def test_embedded_draft_agrees_with_its_report(draft):
    """Agreement with the target's greedy token on held-out text, recomputed, lands near the report."""
    report = json.loads((EMBEDDED["tiny-draft"] / "training_report.json").read_text())
    assert report["config"]["model_type"] == "llmopt-mlp-draft" and report["n_params"] == draft.config.n_params
    target, tok = llmopt.load_model("tiny")
    from llmopt.train import split_ids
    ids = split_ids(tok, "test")[:3000]
    got = agreement(draft, ids, target_labels(target, ids))
    assert report["test_agreement"] > 0.4
    assert abs(got - report["test_agreement"]) < 0.08, (got, report["test_agreement"])
    # the transformer draft predicts the corpus, not the target: the distilled MLP is built for this
    assert 0.0 < got < 1.0


def test_save_load_round_trip_and_errors(tmp_path, draft):
    draft.save(tmp_path / "d", tokenizer_folder=EMBEDDED["tiny"])
    again, tok = llmopt.load_model(tmp_path / "d")
    assert isinstance(again, MLPDraft) and tok.encode("ROMEO") == llmopt.load_model("tiny")[1].encode("ROMEO")
    ctx = torch.randint(0, 4096, (3, draft.config.context))
    with torch.no_grad():
        torch.testing.assert_close(again(ctx), draft(ctx), rtol=0, atol=0)
    (tmp_path / "d" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        llmopt.load_model(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    draft.save(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps(dict(cfg, hidden_dim=99)))
    with pytest.raises(ValueError, match="do not match its config"):
        llmopt.load_model(tmp_path / "d")


def test_distillation_cli_learns_the_target(tmp_path):
    """A short run of `python -m llmopt.draft` writes a loadable draft that copies the target
    far better than chance, and speculative output with it is still the target's own."""
    out = tmp_path / "draft"
    main(["--target", "tiny", "--out", str(out), "--epochs", "1", "--max-train-tokens", "60000",
          "--sampled-sequences", "4", "--hidden-dim", "256", "--max-eval-tokens", "8000"])
    report = json.loads((out / "training_report.json").read_text())
    assert report["train_positions"] > 60000 and report["validation_agreement"] > 0.15
    assert "Distilled from `tiny`" in (out / "TRAINING.md").read_text()
    d, _ = llmopt.load_model(out)
    target, tok = llmopt.load_model("tiny")
    ref = llmopt.generate(target, tok, "KING:\nNow", max_new_tokens=40, ignore_eos=True)
    from llmopt.speculative import speculative_generate
    g = speculative_generate(target, d, tok, "KING:\nNow", k=3, max_new_tokens=40, ignore_eos=True)
    assert g.token_ids == ref.token_ids and g.stats["accepted"] > 0


def test_distillation_cli_puts_the_target_on_the_device_asked(tmp_path, capsys):
    """--device (default "auto": a GPU when there is one) is where the target labels and writes text; a
    device this machine lacks is a usage error that names it, before any work."""
    with pytest.raises(SystemExit):
        main(["--target", "tiny", "--out", str(tmp_path / "d"), "--device", "cuda:7"])
    assert "cuda:7" in capsys.readouterr().err and not (tmp_path / "d").exists()

def test_the_draft_cannot_be_used_as_a_generator(draft):
    tok = llmopt.load_model("tiny")[1]
    with pytest.raises(TypeError, match="only proposes tokens.*speculative_generate"):
        llmopt.generate(draft, tok, "ROMEO:")
    from llmopt.speculative import speculative_generate
    with pytest.raises(TypeError, match="MLP draft"):
        speculative_generate(draft, "lookup", tok, "ROMEO:")
