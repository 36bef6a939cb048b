"""The Shakespeare corpus and its fixed split by work (notebooks 00 and 11).

Held-out text is whole works the models never saw in training, so held-out
perplexity measures generalization, not memorization.
"""
from __future__ import annotations

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
