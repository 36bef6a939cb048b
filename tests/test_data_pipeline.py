"""The Dask tokenization pipeline: same tokens as the serial path, shards that training reads."""
import getpass
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llmopt.data import TokenShards, clean_line, make_large_corpus, scratch_dir, tokenize_dask, tokenize_serial
from llmopt.load import EMBEDDED

TOKENIZER = EMBEDDED["tiny"] / "tokenizer.json"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return make_large_corpus(folder, 3 * 2**20, file_bytes=2**20)


def test_corpus_files_have_the_asked_size(corpus):
    assert len(corpus) == 3
    assert sum(p.stat().st_size for p in corpus) >= 3 * 2**20
    assert clean_line("  To  be,\tor not  ") == "To be, or not\n"


@pytest.mark.parametrize("piece_bytes", [1, 100, 2**20])
def test_a_block_tokenized_piece_by_piece_gives_its_lines_tokens(piece_bytes):
    from llmopt.data import load_split, tokenize_block, tokenize_lines
    text = load_split("validation")[0][:20_000] + "\n  \n\tÉlan, naïve café:  ‘quoted’\n\nlast line without a break"
    whole = tokenize_lines(text.split("\n"), str(TOKENIZER))
    pieces = tokenize_block(text.encode("utf-8"), str(TOKENIZER), piece_bytes=piece_bytes)
    assert pieces.dtype == whole.dtype and pieces.tolist() == whole.tolist() and len(whole) > 1000
    assert len(tokenize_block(b"", str(TOKENIZER))) == 0


def test_dask_and_serial_give_identical_tokens(corpus, tmp_path):
    serial = tokenize_serial(corpus, TOKENIZER, tmp_path / "serial")
    parallel = tokenize_dask(corpus, TOKENIZER, tmp_path / "dask", blocksize=300_000, n_workers=2,
                             progress=False)
    assert parallel["shards"] > len(corpus)              # files were cut into several partitions
    assert parallel["tokens"] == serial["tokens"] > 500_000
    a, b = TokenShards(tmp_path / "serial").tokens(), TokenShards(tmp_path / "dask").tokens()
    assert np.array_equal(a, b)
    shards = TokenShards(tmp_path / "dask")
    first = shards.lengths[0]
    for n in (0, 5, first, first + 7, len(b)):                     # within a shard, across shards, all
        assert np.array_equal(shards.tokens(limit=n), b[:n])
    manifest = json.loads((tmp_path / "dask" / "manifest.json").read_text())
    assert sum(manifest["counts"]) == manifest["tokens"] and manifest["dtype"] == "uint16"
    # the shards decode back to the cleaned text
    from tokenizers import Tokenizer
    text = Tokenizer.from_file(str(TOKENIZER)).decode(b[:200].tolist())
    assert text and "  " not in text


def test_pipeline_runs_on_an_existing_cluster(corpus, tmp_path):
    from dask.distributed import LocalCluster
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        info = tokenize_dask(corpus[:1], TOKENIZER, tmp_path / "s", blocksize=400_000,
                             scheduler=cluster.scheduler_address, progress=False)
    assert info["tokens"] == len(TokenShards(tmp_path / "s"))


def test_shards_feed_training(corpus, tmp_path):
    tokenize_dask(corpus[:1], TOKENIZER, tmp_path / "s", blocksize=400_000, n_workers=1, progress=False)
    shards = TokenShards(tmp_path / "s")
    x, y = shards.get_batch(4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    from llmopt.train import main
    out = tmp_path / "model"
    main(["--preset", "tiny-draft-llama", "--out", str(out), "--tokenizer", str(EMBEDDED["tiny"]),
          "--shards", str(tmp_path / "s"), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
          "--eval-tokens", "256", "--eval-every", "1000"])
    report = json.loads((out / "training_report.json").read_text())
    assert report["train_tokens"] == len(shards)
    with pytest.raises(FileNotFoundError, match="shard"):
        TokenShards(tmp_path)


def test_missing_inputs_are_named_before_any_worker_starts(corpus, tmp_path):
    for fn in (tokenize_serial, tokenize_dask):
        with pytest.raises(FileNotFoundError, match="corpus file.*nope.txt"):
            fn([*corpus[:1], tmp_path / "nope.txt"], TOKENIZER, tmp_path / "out")
        with pytest.raises(FileNotFoundError, match="tokenizer file .*missing.json' not found"):
            fn(corpus[:1], tmp_path / "missing.json", tmp_path / "out")
        with pytest.raises(ValueError, match="non-empty list"):
            fn(str(corpus[0]), TOKENIZER, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_scratch_dirs_go_with_their_process_or_at_the_next_start(tmp_path, monkeypatch):
    """A process's scratch folder is removed when it exits; one that a killed process left is removed
    by the next process that asks for one; a running process's folder stays."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)          # read TMPDIR again
    code = ("import os, sys; from llmopt.data import scratch_dir; d = scratch_dir('test'); "
            "(d / 'big').write_bytes(bytes(1000)); print(d, flush=True); "
            "os._exit(0) if sys.argv[1] == 'killed' else None")   # os._exit: no clean-up, as a kill
    left = {how: Path(subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                                     check=True).stdout.strip()) for how in ("exits", "killed")}
    root = tmp_path / f"llmopt-test-{getpass.getuser()}"
    assert left["exits"].parent == left["killed"].parent == root
    assert not left["exits"].exists() and (left["killed"] / "big").exists()
    mine = scratch_dir("test")
    assert mine == root / str(os.getpid()) and mine.is_dir() and not any(mine.iterdir())
    assert not left["killed"].exists()                     # the killed process's folder went
    (mine / "kept").touch()
    other = subprocess.run([sys.executable, "-c", code, "exits"], capture_output=True, text=True, check=True)
    assert (mine / "kept").exists() and not Path(other.stdout.strip()).exists()   # a running one's stays


def test_a_worker_importing_llmopt_data_never_imports_torch():
    """The package loads names on first use: a Dask worker's `llmopt.data` costs no torch import."""
    code = ("import sys, llmopt.data; assert 'torch' not in sys.modules, 'llmopt.data imported torch'; "
            "import llmopt; assert 'torch' not in sys.modules; llmopt.load_model; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
