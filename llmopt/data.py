"""The Shakespeare corpus and its fixed split by work (notebooks 00 and 11).

Held-out text is whole works the models never saw in training, so held-out
perplexity measures generalization, not memorization.
"""
from __future__ import annotations

import atexit
import getpass
import itertools
import os
import shutil
import tempfile
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CORPUS_DIR = DATA_DIR / "shakespeare"

# Whole works held out: fixed forever, so every figure in the workbook is comparable.
VALIDATION_WORKS = ("julius_caesar", "merchant_of_venice")
TEST_WORKS = ("macbeth", "twelfth_night")
SPLITS = ("train", "validation", "test")


def list_works() -> list[str]:
    """Names of the corpus's works (file names without `_gut.txt`), sorted."""
    if not CORPUS_DIR.is_dir():
        raise FileNotFoundError(f"corpus folder {CORPUS_DIR} is missing; the repository ships "
                                "it in data/shakespeare (re-clone, or copy it from shared/)")
    return sorted(p.name[: -len("_gut.txt")] for p in CORPUS_DIR.glob("*_gut.txt"))


def split_of(work: str) -> str:
    if work in VALIDATION_WORKS:
        return "validation"
    if work in TEST_WORKS:
        return "test"
    return "train"


def load_split(split: str) -> list[str]:
    """The texts of one split ("train", "validation" or "test"), one string per work."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [(CORPUS_DIR / f"{w}_gut.txt").read_text(encoding="utf-8")
            for w in list_works() if split_of(w) == split]


def load_text(split: str, eos: str = "<|endoftext|>") -> str:
    """One split as a single string, works separated by the end-of-text marker."""
    return eos.join(load_split(split))


# ---- corpora larger than memory: clean, tokenize and shard with Dask (notebook 12) -------------
#
# The unit of work is a line of text: both pipelines clean each line and tokenize
# lines in batches (`encode_batch`), so their token streams are identical and the
# only difference is how much is held in memory at once, and by how many processes.

import re  # noqa: E402
import time  # noqa: E402

SHARD_DTYPE = "uint16"           # token ids < 65,536: two bytes each
_SPACES = re.compile(r"[ \t]+")
_TOKENIZERS: dict = {}


def clean_line(line: str) -> str:
    """Collapse runs of spaces and tabs, strip each line's ends; keep the line break."""
    return _SPACES.sub(" ", line.strip()) + "\n"


def _tokenizer(path: str):
    """One tokenizers.Tokenizer per process (each Dask worker loads it once)."""
    if path not in _TOKENIZERS:
        from tokenizers import Tokenizer as HFTokenizer
        _TOKENIZERS[path] = HFTokenizer.from_file(str(path))
    return _TOKENIZERS[path]


def _joined(parts: list):
    """Arrays of ids end to end: one uint16 array (empty for no parts)."""
    import numpy as np
    return np.concatenate(parts) if parts else np.zeros(0, dtype=SHARD_DTYPE)


def tokenize_lines(lines: list[str], tokenizer_json: str, chunk: int = 20_000):
    """Clean and tokenize a list of lines; returns one uint16 numpy array of ids.

    Lines go to the tokenizer `chunk` at a time: its Encoding objects (ids, offsets,
    token strings, masks) take tens of bytes per token, so only ids are kept.
    """
    import numpy as np
    tok = _tokenizer(tokenizer_json)
    lines = [x for x in lines if x.strip()]
    parts = []
    for i in range(0, len(lines), chunk):
        enc = tok.encode_batch([clean_line(x) for x in lines[i:i + chunk]])
        # one array a chunk: an array a line would cost ~100 bytes of overhead each (~60 MB a 16 MiB partition)
        parts.append(np.fromiter(itertools.chain.from_iterable(e.ids for e in enc), dtype=SHARD_DTYPE))
        del enc
    return _joined(parts)


def tokenize_block(block: bytes, tokenizer_json: str, piece_bytes: int = 2**20):
    """Tokenize a block of whole lines of UTF-8 text (what a Dask worker reads), a piece at a time.

    The block stays one bytes object; only `piece_bytes` of it (cut at a line break) is ever
    decoded into Python strings at once. Millions of small strings, freed, leave a worker's
    heap fragmented: memory the process keeps but Dask cannot account for.
    """
    parts, start = [], 0
    while start < len(block):
        cut = block.find(b"\n", start + piece_bytes)
        end = len(block) if cut < 0 else cut + 1
        parts.append(tokenize_lines(block[start:end].decode("utf-8").split("\n"), tokenizer_json))
        start = end
    return _joined(parts)


def make_large_corpus(out_dir, total_bytes: int, file_bytes: int = 64 * 2**20,
                      split: str = "train") -> list[Path]:
    """Write the `split` text repeated until `total_bytes`, in files of about `file_bytes`.

    Stands in for a corpus bigger than memory; returns the file paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = load_text(split, eos="\n")
    data = text.encode("utf-8")
    files, written, i = [], 0, 0
    while written < total_bytes:
        path = out_dir / f"corpus-{i:04d}.txt"
        size = min(file_bytes, total_bytes - written)
        with open(path, "wb") as f:
            left = size
            while left > 0:
                chunk = data[:left]
                f.write(chunk)
                left -= len(chunk)
            if not chunk.endswith(b"\n"):
                f.write(b"\n")
        written += size
        files.append(path)
        i += 1
    return files


def scratch_dir(name: str) -> Path:
    """A new empty folder for this process's large temporary files (notebook 12's corpus and shards):
    `<temp folder>/llmopt-<name>-<user>/<process id>`, removed when the process exits (a Jupyter
    kernel shut down or restarted; not one that is killed). Folders that earlier processes left, killed
    before they could remove theirs, are removed now, so runs never pile up."""
    import psutil
    root = Path(tempfile.gettempdir()) / f"llmopt-{name}-{getpass.getuser()}"
    root.mkdir(exist_ok=True)
    for old in root.iterdir():
        if old.name.isdigit() and not psutil.pid_exists(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    folder = root / str(os.getpid())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _write_shard(ids, path: Path) -> int:
    import numpy as np
    np.save(path, ids)
    return int(len(ids))


def _check_inputs(files, tokenizer_json) -> None:
    """Refuse a missing corpus file or tokenizer here, with its path, rather than inside a worker."""
    if isinstance(files, (str, Path)) or not files:
        raise ValueError(f"files must be a non-empty list of text files, got {files!r}")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} corpus file(s) not found: {missing[:3]}")
    if not Path(tokenizer_json).is_file():
        raise FileNotFoundError(f"tokenizer file {str(tokenizer_json)!r} not found: give a tokenizers JSON "
                                f"file, such as {DATA_DIR / 'tiny' / 'tokenizer.json'}")


def tokenize_serial(files, tokenizer_json, out_dir) -> dict:
    """The naive way: read the whole corpus into memory, tokenize it, write one shard.

    Peak memory grows with the corpus (all its text and all its ids are held at once).
    """
    import numpy as np
    _check_inputs(files, tokenizer_json)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    for f in files:
        lines.extend(Path(f).read_text(encoding="utf-8").splitlines())
    ids = tokenize_lines(lines, str(tokenizer_json))
    n = _write_shard(np.asarray(ids), out_dir / "shard-00000.npy")
    return _manifest(out_dir, [n], time.perf_counter() - t0, "serial")


def _manifest(out_dir: Path, counts: list[int], seconds: float, how: str) -> dict:
    import json
    info = {"how": how, "shards": len(counts), "tokens": int(sum(counts)), "counts": counts,
            "seconds": seconds, "dtype": SHARD_DTYPE}
    (out_dir / "manifest.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def tokenize_dask(files, tokenizer_json, out_dir, *, blocksize: str | int = "16MiB",
                  n_workers: int = 2, memory_limit: str = "1GiB", scheduler: str | None = None,
                  progress: bool = True, client=None) -> dict:
    """Clean, tokenize and shard `files` in parallel with Dask, one shard per partition.

    `dask.bytes.read_bytes` cuts the files into partitions of about `blocksize` at line
    breaks; each partition is read, tokenized (`tokenize_block`) and written by a worker,
    so no process ever holds more than a few partitions. Runs on a `distributed.LocalCluster` of
    `n_workers` processes (each limited to `memory_limit`), or on an existing
    cluster: pass its scheduler address (`scheduler="tcp://host:8786"`, after
    `dask scheduler` on one machine and `dask worker tcp://host:8786` on each of
    the others; every worker needs llmopt installed and the files at the same path)
    or a `distributed.Client`.
    """
    import dask
    from dask.bytes import read_bytes
    from dask.distributed import Client, LocalCluster, as_completed
    if client is None and scheduler is None:    # on another cluster the paths are the workers' to find
        _check_inputs(files, tokenizer_json)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    own_cluster, own_client = None, client is None
    if client is None:
        if scheduler is not None:
            client = Client(scheduler)
        else:
            own_cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                       memory_limit=memory_limit, dashboard_address=":0",
                                       processes=True)
            client = Client(own_cluster)
    try:
        t0 = time.perf_counter()
        # blocks of bytes, not lists of lines: a 16 MiB block as its 619k lines (Python strings) is 45 MB
        _, per_file = read_bytes([str(f) for f in files], delimiter=b"\n", blocksize=blocksize, sample=False)
        parts = [block for blocks in per_file for block in blocks]
        tok = str(Path(tokenizer_json).resolve())

        def work(block, index, tok=tok, out_dir=str(out_dir.resolve())):
            return index, _write_shard(tokenize_block(block, tok), Path(out_dir) / f"shard-{index:05d}.npy")

        futures = client.compute([dask.delayed(work)(p, i) for i, p in enumerate(parts)])
        counts = [0] * len(futures)
        done = as_completed(futures)
        if progress:
            from tqdm.auto import tqdm
            done = tqdm(done, total=len(futures), desc="tokenize partitions")
        for fut in done:
            index, n = fut.result()
            counts[index] = n
        return _manifest(out_dir, counts, time.perf_counter() - t0, f"dask ({len(futures)} partitions)")
    finally:
        if own_client:
            client.close()
        if own_cluster is not None:
            own_cluster.close()


class TokenShards:
    """Token shards on disk, memory-mapped: training reads random windows without loading them."""

    def __init__(self, folder) -> None:
        import numpy as np
        self.folder = Path(folder)
        paths = sorted(self.folder.glob("shard-*.npy"))
        if not paths:
            raise FileNotFoundError(f"no shard-*.npy files in {self.folder}: run tokenize_dask first")
        self.shards = [np.load(p, mmap_mode="r") for p in paths]
        self.lengths = [len(s) for s in self.shards]

    def __len__(self) -> int:
        return sum(self.lengths)

    def tokens(self, limit: int | None = None):
        """Every token in order, or the first `limit`: loaded into memory (for checks), reading only
        the shards they need."""
        import numpy as np
        parts, left = [], len(self) if limit is None else limit
        for s in self.shards:
            if left <= 0:
                break
            parts.append(np.asarray(s[:left]))
            left -= len(parts[-1])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.shards[0].dtype)

    def get_batch(self, batch_size: int, seq_len: int, gen):
        """Random windows [B, T] and their next-token targets, from shards chosen by size."""
        import torch
        usable = [i for i, n in enumerate(self.lengths) if n > seq_len + 1]
        if not usable:
            raise ValueError(f"every shard is shorter than seq_len + 1 = {seq_len + 1} tokens")
        weights = torch.tensor([float(self.lengths[i]) for i in usable])
        picks = torch.multinomial(weights, batch_size, replacement=True, generator=gen).tolist()
        xs, ys = [], []
        for p in picks:
            shard = self.shards[usable[p]]
            s = int(torch.randint(0, len(shard) - seq_len - 1, (1,), generator=gen))
            window = torch.from_numpy(shard[s:s + seq_len + 1].astype("int64"))
            xs.append(window[:-1])
            ys.append(window[1:])
        return torch.stack(xs), torch.stack(ys)
