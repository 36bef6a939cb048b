"""Mixed precision: dtype checks, the fp16 overflow demonstration, numerics against fp32, AMP training."""
import warnings

import pytest
import torch

import llmopt
from llmopt import precision


def test_overflow_demo():
    d = precision.overflow_demo()
    assert d["fp32"] == 90000.0
    assert d["fp16"] == float("inf")                      # above fp16's max of 65,504
    assert d["bf16"] == pytest.approx(90000, rel=1 / 128)  # in range, 8 bits of precision
    assert d["fp16_max"] == 65504.0 and d["bf16_max"] > 3e38


def test_dtype_names_and_errors():
    assert precision.as_dtype("bf16") is torch.bfloat16
    assert precision.as_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of fp32, fp16, bf16"):
        precision.as_dtype("fp8")


def test_dtype_names_load_and_build():
    model, _ = llmopt.load_model("tiny", dtype="bf16")
    assert model.dtype is torch.bfloat16 and model.layers[0].mlp.up_proj.weight.dtype is torch.bfloat16
    assert llmopt.build_model(llmopt.get_config("tiny"), dtype="fp16").dtype is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of fp32, fp16, bf16"):
        llmopt.load_model("tiny", dtype="fp8")


def test_a_device_this_machine_lacks_is_a_clear_error(monkeypatch):
    assert precision.check_device(None) == torch.device("cpu")
    assert precision.check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device name"):
        llmopt.load_model("tiny", device="gpu0")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(ValueError, match="CPU-only build; use device='cpu'"):
        llmopt.load_model("tiny", device="cuda")
    with pytest.raises(ValueError, match="CPU-only build"):
        llmopt.build_model(llmopt.get_config("tiny"), device="cuda:0")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="sees no GPU"):
        precision.check_device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="only 2 GPU"):
        precision.check_device("cuda:2")
    assert precision.check_device("cuda:1") == torch.device("cuda", 1)
    # "auto", the notebooks' DEVICE: the GPU when torch sees one, else the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.check_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.check_device("auto") == torch.device("cpu")
    assert llmopt.load_model("tiny", device="auto")[0].device == torch.device("cpu")


def test_cpu_capability_check_warns_or_passes():
    s = precision.dtype_support("cpu", "fp16")
    assert s["supported"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision.check_dtype("cpu", "fp16")
    assert bool(caught) == (not s["native"])
    if not s["native"]:
        with pytest.raises(ValueError, match="no native fp16"):
            precision.check_dtype("cpu", "fp16", strict=True)


def test_bf16_numerics_against_fp32():
    cfg = llmopt.get_config("tiny")
    fp32 = llmopt.build_model(cfg)
    bf16 = llmopt.build_model(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        precision.cast(bf16, "bf16")
    assert bf16.dtype == torch.bfloat16
    ids = torch.randint(0, cfg.vocab_size, (1, 64))
    same = precision.numerics_vs_fp32(fp32, fp32, ids)
    assert same["max_abs_logit_diff"] == 0 and same["top1_agreement"] == 1.0
    r = precision.numerics_vs_fp32(fp32, bf16, ids)
    assert 0 < r["max_abs_logit_diff"] < 0.5 and r["kl_divergence"] >= 0


def test_amp_training_step_matches_fp32_loss():
    from llmopt.train import train_step
    cfg = llmopt.get_config("tiny").replace(n_layers=1)
    losses = {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        model = llmopt.build_model(cfg, seed=0).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (4, 32), generator=g)
        losses[name] = [train_step(model, opt, x[:, :-1], x[:, 1:], amp_dtype=amp) for _ in range(3)]
    assert losses["fp32"][-1] < losses["fp32"][0]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_training_cli_with_fp16_grad_scaler(tmp_path):
    """`python -m llmopt.train --amp fp16` trains with autocast + GradScaler and writes a loadable model."""
    import json
    import warnings
    from llmopt.train import main
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # fp16 may be emulated on this CPU
        main(["--preset", "tiny-draft-llama", "--out", str(tmp_path), "--tokenizer", str(llmopt.load.EMBEDDED["tiny"]), "--steps", "3",
              "--batch-size", "2", "--seq-len", "32", "--eval-every", "3", "--amp", "fp16",
              "--eval-tokens", "256"])
    report = json.loads((tmp_path / "training_report.json").read_text())
    assert report["args"]["amp"] == "fp16" and len(report["history"]) == 1
    model, tok = llmopt.load_model(tmp_path)
    assert model.dtype == torch.float32 and (tmp_path / "TRAINING.md").exists()
    assert len(llmopt.generate(model, tok, "ROMEO:", max_new_tokens=4, ignore_eos=True).token_ids) == 4
