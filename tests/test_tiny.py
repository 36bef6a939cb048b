"""The embedded models: ordinary HF folders, loaded identically by llmopt and transformers."""
import json
import math

import pytest
import torch

import llmopt
from llmopt.data import TEST_WORKS, VALIDATION_WORKS, list_works, load_split, split_of
from llmopt.load import EMBEDDED


@pytest.fixture(scope="module")
def tiny():
    return llmopt.load_model("tiny")


def test_split_is_by_whole_work_and_fixed():
    works = list_works()
    assert len(works) == 42
    assert all(split_of(w) == "test" for w in TEST_WORKS)
    assert all(split_of(w) == "validation" for w in VALIDATION_WORKS)
    assert len(load_split("train")) == 42 - len(TEST_WORKS) - len(VALIDATION_WORKS)
    with pytest.raises(ValueError, match="split must be one of"):
        load_split("dev")


@pytest.mark.parametrize("name", ["tiny", "tiny-draft-llama"])
def test_transformers_loads_the_folder_unchanged(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = EMBEDDED[name]
    model, tok = llmopt.load_model(name)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    text = "KING LEAR:\nBlow, winds, and crack your cheeks!"
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])), hf(torch.tensor([ids])).logits,
                                   atol=1e-4, rtol=1e-4)
    ours = llmopt.generate(model, tok, text, max_new_tokens=32, ignore_eos=True)
    theirs = llmopt.hf_generate(hf, torch.tensor([ids]), max_new_tokens=32)
    assert ours.token_ids == theirs.token_ids


def test_models_share_the_tokenizer_and_fit_the_size_budget():
    a = (EMBEDDED["tiny"] / "tokenizer.json").read_bytes()
    for draft in ("tiny-draft", "tiny-draft-llama"):
        assert (EMBEDDED[draft] / "tokenizer.json").read_bytes() == a
    total = sum(f.stat().st_size for n in EMBEDDED.values() for f in n.iterdir())
    assert total < 30 * 2**20, f"embedded checkpoints are {total / 2**20:.1f} MiB"
    tiny_cfg = json.loads((EMBEDDED["tiny"] / "config.json").read_text())
    assert tiny_cfg["architectures"] == ["LlamaForCausalLM"]


def test_training_report_and_heldout_perplexity(tiny):
    model, tok = tiny
    report = json.loads((EMBEDDED["tiny"] / "training_report.json").read_text())
    assert report["test_works"] == list(TEST_WORKS) and report["train_seconds"] < 40 * 60
    # our metric on the first 4k test tokens lands near the report's full-split figure
    ppl = llmopt.metrics.perplexity(model, tok, split="test", context=256, max_tokens=4096)
    assert ppl < 2 * report["test_perplexity"] and report["test_perplexity"] < 100
    draft_report = json.loads((EMBEDDED["tiny-draft-llama"] / "training_report.json").read_text())
    assert report["test_perplexity"] < draft_report["test_perplexity"]  # the bigger model is better


def test_every_cache_gives_the_same_greedy_text(tiny):
    model, tok = tiny
    outs = {kind: llmopt.generate(model, tok, "HAMLET:\n", max_new_tokens=40, cache=kind,
                                  ignore_eos=True).token_ids
            for kind in ("none", "dynamic", "static", "paged")}
    assert len({tuple(v) for v in outs.values()}) == 1


def test_samples_look_like_verse(tiny):
    model, tok = tiny
    g = llmopt.generate(model, tok, "ROMEO:\n", max_new_tokens=80, temperature=0.8, top_p=0.95, seed=0)
    words = g.text.split()
    assert len(words) > 20
    common = {"the", "and", "i", "to", "of", "a", "my", "you", "that", "is", "in", "not", "me", "thou"}
    assert sum(w.lower().strip(",.;:!?'") in common for w in words) / len(words) > 0.1
    assert llmopt.metrics.distinct_n([g.text], 2) > 0.5


def test_bench_quick_writes_a_report(tmp_path):
    from llmopt.bench import run_bench
    res = run_bench(["baseline", "cache", "attention"], quick=True, out=tmp_path)
    assert (tmp_path / "report.md").exists() and (tmp_path / "results.json").exists()
    assert (tmp_path / "baseline.png").exists()
    base = res["experiments"][0]
    assert all(r["greedy_token_agreement"] == 1.0 for r in base["rows"])
    assert all(v > 0 for e in res["experiments"] for v in e["ratios"].values())


def test_bench_quick_serving_speculation_and_scoreboard(tmp_path):
    """The later experiments in quick mode: outputs identical, nothing lost, a scoreboard row per technique."""
    from llmopt.bench import run_bench
    res = run_bench(["batching", "dialogue", "load", "chunked", "speculative", "speculative_engine", "evaluation"],
                    quick=True, out=tmp_path)
    by = {e["name"]: e for e in res["experiments"]}
    assert all(r["identical"] for r in by["batching"]["rows"] + by["dialogue"]["rows"])
    # long-tailed dialogue lengths leave static batches idler than uniform ones
    steps = "decode steps, static / continuous (first come first served; the expected ratio)"
    assert by["dialogue"]["ratios"][steps] > by["batching"]["ratios"][steps] > 1
    load = by["load"]["rows"][0]
    assert load["lost"] == 0 and load["failed"] == 0 and load["mismatched_vs_unbatched"] == 0
    assert load["changed_beyond_a_tie"] == 0
    chunked = by["chunked"]
    assert [r["max_step_prefill_tokens"] for r in chunked["rows"]] == [600, 128]
    assert chunked["ratios"]["outputs differing from unbatched greedy, not at a rounding tie"] == 0
    assert all(r["identical"] for r in by["speculative"]["rows"][1:])
    assert by["speculative"]["ratios"]["tokens per target forward, tiny-draft k=4"] > 1
    engine = by["speculative_engine"]
    assert engine["ratios"]["batches whose outputs differ with speculation"] == 0
    assert all(r["speculative_forwards_per_token"] < r["plain_forwards_per_token"]
               for r in engine["rows"] if r["draft"] == "tiny-draft (MLP)")
    assert {r["technique"] for r in by["evaluation"]["rows"]} >= {"fp32 baseline", "int8 weight-only"}
    report = (tmp_path / "report.md").read_text()
    assert "Scoreboard" in report and "continuous / static" in report


def test_bench_runs_on_a_users_own_checkpoint(tmp_path, small_tokenizer_dir):
    """`run_bench(model=folder)`: every experiment on a user's Qwen2 checkpoint, against transformers
    on the same weights; what this model cannot do (int4 groups of 64 over 96 channels, tensor
    parallelism over one kv head) is a row that says why, not a crash."""
    from conftest import make_hf_checkpoint
    from llmopt.bench import run_bench
    folder = tmp_path / "my-qwen"
    folder.mkdir()
    make_hf_checkpoint("qwen2", folder, small_tokenizer_dir)        # 1 kv head, MLP width 96
    res = run_bench(["baseline", "cache", "attention", "precision", "quantization", "batching", "load",
                     "chunked", "speculative", "parallel", "evaluation"], quick=True, out=tmp_path / "out",
                    model=str(folder))
    by = {e["name"]: e for e in res["experiments"]}
    assert res["model"] == str(folder) and "Model: **my-qwen**" in (tmp_path / "out" / "report.md").read_text()
    assert all(r["model"] == "my-qwen" for e in res["experiments"] for r in e["rows"])
    assert all(r["greedy_token_agreement"] == 1.0 for r in by["baseline"]["rows"])
    assert all(not e.get("goal") for e in res["experiments"] if e["name"] not in ("load", "chunked"))  # tiny's
    chunked = by["chunked"]                          # the long prompt fits this model's 256-token context
    assert chunked["rows"][0]["max_step_prefill_tokens"] == 240 and chunked["rows"][1]["max_step_prefill_tokens"] == 128
    assert chunked["ratios"]["outputs differing from unbatched greedy, not at a rounding tie"] == 0
    quant = {r["label"]: r for r in by["quantization"]["rows"]}
    assert "multiple of group_size (64)" in quant["my-qwen int4 g64"]["skipped"]
    assert quant["my-qwen int4 g32"]["perplexity_change"] < 0.05 and quant["my-qwen int8"]["bytes_ratio"] < 0.3
    parallel = {r["label"]: r for r in by["parallel"]["rows"]}
    assert "n_kv_heads (1) divisible by 2" in parallel["tensor parallel, 2 ranks"]["skipped"]
    assert parallel["data parallel, 2 ranks"]["identical"]
    assert all(r["identical"] for r in by["batching"]["rows"]) and by["load"]["rows"][0]["lost"] == 0
    assert [r["label"] for r in by["speculative"]["rows"][1:]] == [
        "speculative, prompt lookup", "speculative, n-gram table", "speculative, prompt lookup + n-gram"]
    assert all(r["identical"] for r in by["speculative"]["rows"][1:])
    assert "int4 weight-only (g32)" in {r["technique"] for r in by["evaluation"]["rows"]}


def test_bench_scores_and_prompts_with_your_own_text(tmp_path, tiny):
    """`run_bench(text=FILE)`: perplexity and agreement are scored on the text (equal to the metrics run
    on its ids directly), the prompts come from it, and goals set on the plays' text are left out."""
    from llmopt.bench import prompt_spans, run_bench
    from llmopt.metrics import perplexity
    model, tok = tiny
    text = load_split("train")[0][:30_000]        # a work tiny trained on: easier than the test split
    (tmp_path / "mine.txt").write_text(text, encoding="utf-8")
    res = run_bench(["precision", "speculative", "dialogue", "evaluation"], quick=True, out=tmp_path / "out",
                    text=tmp_path / "mine.txt")
    ids = torch.tensor(tok.encode(text))
    assert res["text"] == {"path": str(tmp_path / "mine.txt"), "tokens": len(ids)}
    assert f"Text: **{tmp_path / 'mine.txt'}** ({len(ids):,} tokens)" in (tmp_path / "out" / "report.md").read_text()
    by = {e["name"]: e for e in res["experiments"]}
    fp32 = next(r for r in by["precision"]["rows"] if r["label"] == "tiny fp32")
    assert fp32["perplexity"] == pytest.approx(perplexity(model, ids=ids[:2048], context=256), rel=1e-6)
    assert fp32["perplexity"] < 0.8 * perplexity(model, tok, split="test", max_tokens=2048)
    board = {r["technique"]: r for r in by["evaluation"]["rows"]}
    assert board["fp32 baseline"]["perplexity"] == pytest.approx(
        perplexity(model, ids=ids[:1024], context=256), rel=1e-6)
    assert all(r["identical"] for r in by["speculative"]["rows"][1:]) and not by["speculative"]["goal"]
    assert "prompts from the plays, not your text" in by["dialogue"]["title"]
    # the prompts: spans of the text, 400 tokens apart as on the plays, closer when the text is short
    assert prompt_spans(range(2000), 3) == [list(range(s, s + 32)) for s in (0, 400, 800)]
    assert prompt_spans(range(200), 4) == [list(range(s, s + 32)) for s in (0, 56, 112, 168)]


def test_bench_refuses_a_text_it_cannot_use(tmp_path, capsys):
    from llmopt.__main__ import main
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("ROMEO:\nBut soft!")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 200)
    for name, message in [("missing.txt", "not found: give the path of a UTF-8 text file"),
                          ("empty.txt", "holds no text"), ("latin1.txt", "is not UTF-8 text"),
                          ("short.txt", "tokens long with this model's tokenizer; the bench needs at least 128")]:
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "cache", "--text", str(tmp_path / name)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_command_line_generates_and_refuses_bad_input_with_a_usage_error(capsys, monkeypatch, tmp_path):
    import json
    import shutil
    from llmopt.__main__ import main
    assert main(["generate", "ROMEO:", "--max-new-tokens", "8"]) == 0
    model, tok = llmopt.load_model("tiny")
    want = llmopt.generate(model, tok, "ROMEO:", max_new_tokens=8).text
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", "ROMEO:", "--max-new-tokens", "8", "--device", "auto"]) == 0   # the CPU here
    assert capsys.readouterr().out == want + "\n"
    # the generate options, and --stats: the text at the end and its timings on stderr
    assert main(["generate", "ROMEO:", "--max-new-tokens", "24", "--graph-steps", "4", "--stats"]) == 0
    out = capsys.readouterr()
    assert out.out == llmopt.generate(model, tok, "ROMEO:", max_new_tokens=24).text + "\n"
    assert "24 tokens (length); TTFT" in out.err and "on cpu in float32" in out.err
    assert main(["generate", "ROMEO:", "--max-new-tokens", "24", "--stop", ",", "--top-k", "5",
                 "--temperature", "0.8", "--seed", "3", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out == llmopt.generate(
        *llmopt.load_model("tiny", dtype="bf16"), "ROMEO:", max_new_tokens=24, stop=",", top_k=5,
        temperature=0.8, seed=3).text + "\n"
    # --logprobs and the penalties (run on the engine): the text, then a line a token with its probability
    assert main(["generate", "ROMEO:", "--max-new-tokens", "12", "--logprobs", "3",
                 "--repetition-penalty", "1.3"]) == 0
    g = llmopt.generate(model, tok, "ROMEO:", max_new_tokens=12, logprobs=3, repetition_penalty=1.3)
    out = capsys.readouterr().out
    assert out.startswith(g.text + "\n\n")
    table = out[len(g.text) + 2:].splitlines()
    assert len(table) == 12
    for line, t, lp in zip(table, g.token_ids, g.logprobs):
        assert line.lstrip().startswith(f"{tok.decode([t])!r} {math.exp(lp):.3f}")
    # --draft: speculative decoding, the same greedy text; --stats adds the acceptance rate
    for draft in ("tiny-draft", "lookup"):
        assert main(["generate", "ROMEO:", "--max-new-tokens", "24", "--draft", draft, "--stats"]) == 0
        out = capsys.readouterr()
        assert out.out == llmopt.generate(model, tok, "ROMEO:", max_new_tokens=24).text + "\n"
        assert "24 tokens (length)" in out.err and "k=4: acceptance" in out.err
        assert "tokens per target forward" in out.err
    # --chat: the prompt as a user's message, through the checkpoint's chat template
    chat = shutil.copytree(llmopt.load.resolve("tiny"), tmp_path / "chat")
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["generate", "Who's there?", "--chat", "--model", str(chat), "--max-new-tokens", "8"]) == 0
    ids = tok.encode("user: Who's there?\nassistant:")
    assert capsys.readouterr().out == llmopt.generate(model, tok, ids, max_new_tokens=8).text + "\n"
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)   # as on a CPU-only torch
    for argv, message in [(["generate", "Hi", "--model", "no-such-model"], "no checkpoint at 'no-such-model'"),
                          (["generate", "Hi", "--chat"], "has no chat template"),
                          (["generate", "Hi", "--temperature", "-1"], "temperature must be >= 0"),
                          (["generate", "Hi", "--graph-steps", "4", "--temperature", "1"], "greedy decoding"),
                          (["generate", "Hi", "--compile", "fast"], "compile must be"),
                          (["generate", "Hi", "--frequency-penalty", "5"], "frequency_penalty must be a number in"),
                          (["generate", "Hi", "--logprobs", "3", "--compile"], "run on the engine's paged cache"),
                          (["generate", "Hi", "--draft", "lookup", "--logprobs", "2", "--sync-every", "4"],
                           "does not take --logprobs, --sync-every"),
                          (["generate", "Hi", "--draft", "no-such-draft"], "no checkpoint at 'no-such-draft'"),
                          (["generate", "Hi", "--draft", "lookup", "--num-speculative-tokens", "0"], "k (draft tokens"),
                          (["generate", "Hi", "--dtype", "int3"], "dtype must be one of"),
                          (["generate", "Hi", "--device", "cuda"], "CPU-only build"),
                          (["bench", "--device", "cuda", "cache"], "CPU-only build"),
                          (["bench", "no-such-experiment"], "unknown experiment"),
                          (["bench", "cache", "--model", "no-such-model"], "no checkpoint at 'no-such-model'"),
                          (["bench", "cache", "--model", "tiny-draft"], "is an MLP draft, not a model to benchmark")]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_chat_command_keeps_the_conversation(capsys, monkeypatch, tmp_path):
    """`python -m llmopt chat`: a turn per line of input, each reply a Session's chat turn (the cache kept, so
    the second turn prefills only its own tokens); a base model's tokenizer is refused with where to go."""
    import io
    import json
    import shutil
    from llmopt.__main__ import main
    chat = shutil.copytree(llmopt.load.resolve("tiny"), tmp_path / "chat")
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] | upper }}:\n{{ m['content'] }}\n\n{% endfor %}"
                               "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}")
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("sys.stdin", io.StringIO("Who's there?\n\nNay, answer me.\n"))
    assert main(["chat", "--model", str(chat), "--system", "Speak as a sentinel.", "--max-new-tokens", "12",
                 "--stats"]) == 0
    out = capsys.readouterr()
    session = llmopt.Session(*llmopt.load_model(chat))
    first = session.chat("Who's there?", system="Speak as a sentinel.", max_new_tokens=12)
    second = session.chat("Nay, answer me.", max_new_tokens=12)
    assert out.out == first.text + "\n" + second.text + "\n"
    assert f"[{second.stats['prefilled_tokens']} tokens prefilled, " in out.err and "0 reused" in out.err
    assert second.stats["prefilled_tokens"] < len(session.ids) // 2
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    with pytest.raises(SystemExit) as exit_:
        main(["chat"])
    assert exit_.value.code == 2 and "has no chat template" in capsys.readouterr().err


@pytest.mark.parametrize("module, argv, message", [
    ("train", ["--preset", "nope", "--out", "x"], "unknown preset 'nope'"),
    ("train", ["--out", "x", "--steps", "0"], "--steps must be >= 1"),
    ("train", ["--out", "x", "--device", "gpu0"], "not a device name"),
    ("train", ["--out", "x", "--tokenizer", "."], "no tokenizer.json in that folder"),
    ("draft", ["--target", "nope", "--out", "x"], "no checkpoint at 'nope'"),
    ("draft", ["--out", "x", "--epochs", "0"], "--epochs must be > 0"),
    ("draft", ["--out", "x", "--context", "0"], "--context must be >= 1"),
    ("parallel", ["tensor"], "run this under torchrun"),
])
def test_training_and_parallel_commands_refuse_bad_input_with_a_usage_error(module, argv, message, capsys,
                                                                             monkeypatch, tmp_path):
    import importlib
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"llmopt.{module}").main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()                      # nothing written
