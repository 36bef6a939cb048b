"""The prepared GPU suite runs end to end in CPU smoke mode, so it never rots."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_suite_smoke(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, timeout=300)
    res = json.loads((tmp_path / "gpu_results.json").read_text())
    assert res["smoke"] and "error" not in res["probes"], res["probes"]
    assert "error" not in res["decode_batch1"], res["decode_batch1"]
    rows = res["decode_batch1"]["rows"]
    assert rows[0]["greedy_token_agreement"] == 1.0
    assert [r["label"] for r in rows][-2:] == ["llmopt (static cache), fused projections", "transformers generate"]
    for part in ("quantized_decode", "attention_prefill", "batching", "batching_dialogue", "speculative",
                 "bitsandbytes"):
        assert "error" not in res[part], res[part]
        assert res[part]["rows"]
    assert all(r["identical"] for r in res["batching"]["rows"] + res["batching_dialogue"]["rows"])
    assert all(r["identical"] for r in res["speculative"]["rows"][1:])
    assert (tmp_path / "gpu_results.md").read_text().startswith("# GPU suite")


def test_gpu_suite_runs_only_the_sections_asked(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(tmp_path),
                    "--only", "attention_prefill"], check=True, cwd=ROOT, timeout=300)
    res = json.loads((tmp_path / "gpu_results.json").read_text())
    assert "attention_prefill" in res and "decode_batch1" not in res and "batching" not in res


def test_kernel_profile_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--smoke",
                          "--variants", "bf16,int8", "--top", "3"], check=True, cwd=ROOT, timeout=300,
                         capture_output=True, text=True).stdout
    assert "== bf16: TPOT" in out and "== int8: TPOT" in out and "aten::" in out
