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


def test_from_transformers_gives_the_same_model(hf_checkpoint):
    """A transformers model held in memory becomes an llmopt model: same logits, same greedy tokens,
    its own copy of the weights; its tokenizer is wrapped, adding BOS only where transformers would."""
    from transformers import PreTrainedTokenizerFast
    from llmopt.profiling import hf_generate
    family, folder, hf = hf_checkpoint
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|endoftext|>")
    model, tok = llmopt.from_transformers(hf, hf_tok)
    assert isinstance(model, llmopt.Transformer) and model.config.architecture == type(hf).__name__
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    prompt = "Friends, Romans, countrymen"
    assert tok.encode(prompt) == hf_tok.encode(prompt, add_special_tokens=False)
    ours = llmopt.generate(model, tok, prompt, max_new_tokens=16, ignore_eos=True)
    assert ours.token_ids == hf_generate(hf, torch.tensor([tok.encode(prompt)]), max_new_tokens=16).token_ids
    assert tok.eos_token_ids == [0]
    hf.generation_config.eos_token_id = [7, 9]        # as Llama 3 instruct lists two
    again, tok2 = llmopt.from_transformers(hf, hf_tok)
    assert tok2.eos_token_ids == [7, 9] and again.config.eos_token_id == [7, 9]   # not the tokenizer's
    with torch.no_grad():
        hf.get_input_embeddings().weight.zero_()      # a copy: changing transformers' weights leaves ours
    assert model.embed_tokens.weight.abs().sum() > 0
    half, none = llmopt.from_transformers(hf, dtype="bf16")
    assert half.dtype == torch.bfloat16 and none is None


def test_from_transformers_adds_bos_only_when_transformers_does(small_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast
    from llmopt.tokenizer import Tokenizer
    from tokenizers.processors import TemplateProcessing
    plain = PreTrainedTokenizerFast(tokenizer_file=str(small_tokenizer_dir / "tokenizer.json"),
                                    bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert not Tokenizer.from_transformers(plain).add_bos
    with_bos = PreTrainedTokenizerFast(tokenizer_file=str(small_tokenizer_dir / "tokenizer.json"),
                                       bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    with_bos._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                            special_tokens=[("<|endoftext|>", 0)])
    wrapped = Tokenizer.from_transformers(with_bos)
    assert wrapped.encode("Romans") == with_bos.encode("Romans") == [0] + plain.encode("Romans")
    with pytest.raises(TypeError, match="expected a transformers tokenizer"):
        Tokenizer.from_transformers("gpt2")


def _tokenizer_folder(folder, source, *, post=None, vocab_files=False, **config):
    """A tokenizer folder made from `source`'s tokenizer.json: with BOS added by its post-processor
    ("template", as Llama 3's), a ByteLevel post-processor or none; or as vocab.json + merges.txt
    (`vocab_files`, GPT-2's format, no tokenizer.json); `config` goes into tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer, processors
    folder.mkdir()
    backend = HFTokenizer.from_file(str(source / "tokenizer.json"))
    if post == "template":
        backend.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", backend.token_to_id("<|endoftext|>"))])
    elif post == "bytelevel":
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        backend.post_processor = None
    if vocab_files:
        model = json.loads(backend.to_str())["model"]
        (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        config.setdefault("tokenizer_class", "GPT2Tokenizer")
    else:
        backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", **config}))
    return folder


@pytest.mark.parametrize("post, vocab_files, config, bos", [
    ("template", False, {}, True),                          # Llama 3: tokenizer.json's post-processor adds BOS
    ("template", False, {"add_bos_token": False}, True),    # transformers 5 reads the post-processor, not the flag
    (None, False, {"add_bos_token": True}, False),          # ... with or without one
    ("bytelevel", False, {"add_bos_token": True}, False),
    (None, False, {}, False),
    (None, True, {"add_bos_token": True}, True),            # no tokenizer.json: transformers honours the flag
    (None, True, {"add_bos_token": False}, False),
])
def test_folder_tokenizer_adds_bos_where_transformers_does(small_tokenizer_dir, tmp_path, post, vocab_files,
                                                          config, bos):
    """A checkpoint's prompt ids are the ones transformers gives for it (its `encode`, special tokens
    added): BOS once or not at all, whichever file says so, and decoding gives the text back."""
    from transformers import AutoTokenizer
    from llmopt.tokenizer import Tokenizer
    folder = _tokenizer_folder(tmp_path / "tok", small_tokenizer_dir, post=post, vocab_files=vocab_files, **config)
    text = "ROMEO:\nBut soft, what light"
    ours, theirs = Tokenizer.from_folder(folder).encode(text), AutoTokenizer.from_pretrained(str(folder)).encode(text)
    assert ours == theirs
    assert (ours[0] == 0) == bos and ours[1:2] != [0]
    assert Tokenizer.from_folder(folder).decode(ours) == text


def test_saved_tokenizer_keeps_its_bos(small_tokenizer_dir, tmp_path):
    """save_tokenizer writes an llmopt Tokenizer that adds BOS so that it still does, once, when
    llmopt or transformers loads the folder (transformers 5 reads BOS from tokenizer.json only)."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer
    from llmopt.tokenizer import Tokenizer, save_tokenizer
    backend = HFTokenizer.from_file(str(small_tokenizer_dir / "tokenizer.json"))
    plain = backend.encode("Romans").ids
    for add_bos, expected in ((True, [0] + plain), (False, plain)):
        tok = Tokenizer(backend, eos_token_id=0, bos_token_id=0, add_bos=add_bos)
        assert tok.encode("Romans") == expected
        folder = tmp_path / f"bos-{add_bos}"
        save_tokenizer(tok, folder)
        assert Tokenizer.from_folder(folder).encode("Romans") == expected
        assert AutoTokenizer.from_pretrained(str(folder)).encode("Romans") == expected


# a Llama 3-like chat template: BOS written by the template, a header a message, a generation prompt
CHAT = ("{{ bos_token }}{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


@pytest.mark.parametrize("post", ["template", None])
def test_chat_prompt_ids_are_transformers_own(small_tokenizer_dir, tmp_path, post):
    """A conversation's prompt ids are what transformers' apply_chat_template gives (with a tokenizer whose
    post-processor adds BOS, as Llama 3's: BOS once, from the template), they prompt generation, and the
    template survives save_tokenizer; a tokenizer without one, or bad messages, is a clear error."""
    from transformers import AutoTokenizer
    from llmopt.tokenizer import Tokenizer, save_tokenizer
    folder = _tokenizer_folder(tmp_path / "tok", small_tokenizer_dir, post=post, chat_template=CHAT)
    messages = [{"role": "system", "content": "Speak as a Dane."}, {"role": "user", "content": "Who's there?"}]
    tok = Tokenizer.from_folder(folder)
    ids = tok.apply_chat_template(messages)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    assert ids == theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[:2] == [0, 0] and ids[2:3] != [0]           # the template's BOS, then the first header's marker
    assert tok.decode(ids, skip_special_tokens=False).endswith("assistant\n")
    history = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert ids[:len(history)] == history and tok.decode(history, skip_special_tokens=False).endswith("there?\n")
    model = llmopt.build_model(get_config("tiny").replace(vocab_size=512, n_layers=1))
    g = llmopt.generate(model, tok, ids, max_new_tokens=4, ignore_eos=True)
    assert g.prompt_ids == ids and len(g.token_ids) == 4
    save_tokenizer(tok, tmp_path / "saved")
    assert Tokenizer.from_folder(tmp_path / "saved").apply_chat_template(messages) == ids
    wrapped = Tokenizer.from_transformers(theirs)                       # a transformers tokenizer, wrapped
    assert wrapped.apply_chat_template(messages) == ids
    plain = Tokenizer.from_folder(_tokenizer_folder(tmp_path / "plain", small_tokenizer_dir, post=post))
    assert plain.chat_template is None
    with pytest.raises(ValueError, match="no chat template.*give the prompt as text"):
        plain.apply_chat_template(messages)
    for bad in ([], "Who's there?", [{"content": "no role"}]):
        with pytest.raises(ValueError, match="messages must be a non-empty list of"):
            tok.apply_chat_template(bad)


def test_transformers_models_get_clear_errors(hf_checkpoint, gpt2):
    _, _, hf = hf_checkpoint
    tok = llmopt.load_model("tiny")[1]
    for run in (lambda m: llmopt.generate(m, tok, [1, 2, 3], max_new_tokens=2),
                lambda m: llmopt.generate_batch(m, tok, [[1, 2]], max_new_tokens=2),
                lambda m: llmopt.Engine(m, tok)):
        with pytest.raises(TypeError, match=f"transformers {type(hf).__name__}: convert it with .*from_transformers"):
            run(hf)
        with pytest.raises(TypeError, match="GPT2LMHeadModel, an architecture llmopt does not implement.*hf_generate"):
            run(gpt2)
    from llmopt.speculative import speculative_generate
    target = llmopt.load_model("tiny")[0]
    with pytest.raises(TypeError, match=r"speculative decoding \(the draft\) runs llmopt models.*from_transformers"):
        speculative_generate(target, hf, tok, [1, 2, 3], max_new_tokens=2)
    with pytest.raises(TypeError, match=r"speculative decoding \(the target\) runs llmopt models"):
        speculative_generate(hf, "lookup", tok, [1, 2, 3], max_new_tokens=2)
    with pytest.raises(ValueError, match="from_transformers converts .*got a GPT2LMHeadModel.*hf_generate"):
        llmopt.from_transformers(gpt2)
    with pytest.raises(ValueError, match="from_transformers converts"):
        llmopt.from_transformers(hf.model)            # the bare decoder, without its head
    hf.config.quantization_config = {"quant_method": "bitsandbytes"}   # as transformers marks a bnb model
    with pytest.raises(ValueError, match=r"already quantized \(bitsandbytes\): convert the full-precision"):
        llmopt.from_transformers(hf)


def test_from_transformers_refuses_offloaded_weights_and_asks_where_a_spread_model_goes(hf_checkpoint):
    _, _, hf = hf_checkpoint
    if torch.cuda.is_available():         # spread over two devices, as a device_map leaves a model
        ids = torch.randint(0, 512, (1, 12))
        with torch.no_grad():
            want = hf(ids).logits
        hf.model.layers[0].to("cuda")
        with pytest.raises(ValueError, match=r"spread over cpu, cuda:0 .*pass device="):
            llmopt.from_transformers(hf)
        model, _ = llmopt.from_transformers(hf, device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(model(ids), want, atol=1e-4, rtol=1e-4)
    hf.model.layers[1].to("meta")         # as disk or CPU offload leaves the weights it keeps elsewhere
    with pytest.raises(ValueError, match="not in memory .*load it fully onto real devices"):
        llmopt.from_transformers(hf, device="cpu")


def test_an_activation_llmopt_lacks_is_refused():
    hf = get_config("tiny").to_hf()
    hf["hidden_act"] = "gelu"
    with pytest.raises(ValueError, match="activation 'gelu'.*SwiGLU"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("name", ["tiny", "tiny-draft"])
def test_load_tokenizer_is_load_models_without_the_weights(name):
    _, tok = llmopt.load_model(name)
    alone = llmopt.load_tokenizer(name)
    text = "ROMEO:\nBut soft, what light"
    assert alone.encode(text) == tok.encode(text) and alone.eos_token_id == tok.eos_token_id is not None
    assert alone.bos_token_id == tok.bos_token_id


def test_a_folder_stops_where_transformers_generate_stops(tmp_path):
    """End-of-sequence ids come from generation_config.json where it names them, as transformers' generate
    takes them (an instruct checkpoint may list its end-of-turn token there beside config.json's): llmopt
    ran past a token transformers stopped at."""
    from transformers import AutoModelForCausalLM
    from llmopt.profiling import hf_generate
    folder = shutil.copytree(llmopt.load.resolve("tiny"), tmp_path / "tiny")
    model, tok = llmopt.load_model(folder)
    ids = tok.encode("ROMEO:")
    free = llmopt.generate(model, tok, ids, max_new_tokens=24, ignore_eos=True).token_ids
    stop = free[5]                                   # a token greedy reaches at step 6 (and not before)
    assert stop not in free[:5] and stop != json.loads((folder / "config.json").read_text())["eos_token_id"]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [0, stop]}))
    model, tok = llmopt.load_model(folder)
    assert tok.eos_token_ids == [0, stop] == model.config.eos_token_id
    assert llmopt.load_tokenizer(folder).eos_token_ids == [0, stop]
    ours = llmopt.generate(model, tok, ids, max_new_tokens=24)
    theirs = hf_generate(AutoModelForCausalLM.from_pretrained(folder), torch.tensor([ids]), max_new_tokens=24,
                         ignore_eos=False)
    assert ours.token_ids == theirs.token_ids == free[:6] and ours.finish_reason == "eos"
    (folder / "generation_config.json").unlink()     # without one, config.json's
    assert llmopt.load_model(folder)[1].eos_token_ids == [0]


def test_save_model_writes_the_tokenizer_load_model_gave(hf_checkpoint, tmp_path):
    """save_model(model, folder, tok) with llmopt's Tokenizer (it failed with an AttributeError), or with
    a transformers tokenizer wrapped by from_transformers: the folder loads with the same encoding and
    end-of-text in llmopt and in transformers."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    _, folder, hf = hf_checkpoint
    text = "Friends, Romans, countrymen, lend me your ears"
    model, tok = llmopt.load_model(folder)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|endoftext|>")
    for name, t in (("ours", tok), ("wrapped", llmopt.from_transformers(hf, hf_tok)[1])):
        out = tmp_path / name
        llmopt.save_model(model, out, t)
        again, tok2 = llmopt.load_model(out)
        assert tok2.encode(text) == tok.encode(text) and tok2.eos_token_ids == tok.eos_token_ids
        assert AutoTokenizer.from_pretrained(str(out)).encode(text, add_special_tokens=False) == tok.encode(text)
    tiny, tiny_tok = llmopt.load_model("tiny")
    llmopt.save_model(tiny, tmp_path / "tiny", tiny_tok)
    assert llmopt.load_model(tmp_path / "tiny")[1].encode(text) == tiny_tok.encode(text)


def test_a_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    """Weights but no tokenizer files: transformers' fallback gave a tokenizer with no vocabulary, so
    every prompt encoded to nothing ("prompt is empty")."""
    llmopt.save_model(llmopt.load_model("tiny")[0], tmp_path)
    for load in (llmopt.load_model, llmopt.load_tokenizer):
        with pytest.raises(FileNotFoundError, match="has no tokenizer .*save_model\\(model, folder, tokenizer\\)"):
            load(tmp_path)


def _cache_holding(root, repo, tokenizer_dir, weights=True):
    """A Hugging Face hub cache at `root` holding one snapshot of `repo` (a random Qwen2)."""
    from conftest import make_hf_checkpoint
    entry = root / ("models--" + repo.replace("/", "--"))
    snapshot = entry / "snapshots" / "0123abcd"
    model = make_hf_checkpoint("qwen2", snapshot, tokenizer_dir)
    if not weights:
        (snapshot / "model.safetensors").rename(snapshot / "pytorch_model.bin")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    return model


@pytest.fixture
def fake_gpu(monkeypatch):
    """pick_model's "auto" device is a GPU of `fake_gpu.total` bytes (default 80 GiB)."""
    import types
    gpu = types.SimpleNamespace(total=80 * 2**30)
    monkeypatch.delenv("LLMOPT_CI", raising=False)
    monkeypatch.delenv("LLMOPT_MODEL", raising=False)
    real = llmopt.load.check_device
    monkeypatch.setattr(llmopt.load, "check_device",
                        lambda device: torch.device("cuda") if device == "auto" else real(device))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=gpu.total))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Fake GPU")
    return gpu


def test_pick_model_keeps_a_choice_and_stays_on_tiny_off_a_gpu_or_in_ci(monkeypatch, capsys):
    assert llmopt.pick_model("tiny-draft-llama", "cpu") == "tiny-draft-llama"
    assert "as set in the parameters cell" in capsys.readouterr().out
    monkeypatch.setenv("LLMOPT_MODEL", "/models/mine")
    assert llmopt.pick_model("auto", "cpu") == "/models/mine"
    assert "model: /models/mine (from $LLMOPT_MODEL)" in capsys.readouterr().out
    assert llmopt.pick_model("tiny", "cpu", verbose=False) == "tiny"     # an explicit name beats the variable
    monkeypatch.delenv("LLMOPT_MODEL")
    assert llmopt.pick_model("auto", "cpu") == "tiny" and "CI sizes" in capsys.readouterr().out
    monkeypatch.delenv("LLMOPT_CI")
    assert llmopt.pick_model("auto", "cpu") == "tiny" and "on cpu" in capsys.readouterr().out


def test_pick_model_takes_a_cached_checkpoint_on_a_gpu_and_loads_it_offline(tmp_path, monkeypatch, capsys,
                                                                          fake_gpu, small_tokenizer_dir):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = "HuggingFaceTB/SmolLM2-135M"
    assert llmopt.pick_model("auto") == "tiny" and "none of" in capsys.readouterr().out   # an empty cache
    hf = _cache_holding(tmp_path, repo, small_tokenizer_dir)
    assert llmopt.pick_model("auto") == repo
    assert "found in the Hugging Face cache" in capsys.readouterr().out
    # the candidates' order decides; only cached ones count
    assert llmopt.pick_model("auto", candidates=("Qwen/Qwen2.5-0.5B", repo), verbose=False) == repo
    fake_gpu.total = 9 * llmopt.load._weight_bytes(llmopt.load.cached_checkpoint(repo))
    assert llmopt.pick_model("auto", verbose=False) == "tiny"          # too big to fine-tune on this GPU

    def online(*args, **kw):
        if not kw.get("local_files_only"):
            raise AssertionError("the network was asked for a cached checkpoint")
        return real(*args, **kw)
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", online)
    model, tok = llmopt.load_model(repo)                              # the hub name, read from the cache
    ids = torch.tensor([tok.encode("ROMEO:\nBut soft")])
    torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_cached_snapshot_without_safetensors_is_not_picked(tmp_path, monkeypatch, fake_gpu, small_tokenizer_dir):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _cache_holding(tmp_path, "Qwen/Qwen2.5-0.5B", small_tokenizer_dir, weights=False)
    assert llmopt.load.cached_checkpoint("Qwen/Qwen2.5-0.5B") is None
    assert llmopt.pick_model("auto", verbose=False) == "tiny"
