"""The README stays true: its Python examples run as written, and the files it links to or names exist."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()


def test_the_python_examples_run_as_written(capsys):
    """Each ```python block, in order, in one namespace (a later block uses an earlier one's model)."""
    blocks = re.findall(r"```python\n(.*?)```", TEXT, re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md, python block {i + 1}", "exec"), namespace)
    g = namespace["g"]                       # the last block's speculative generation
    assert g.stats["tokens_per_target_forward"] >= 1 and len(g.token_ids) == 64
    assert len(namespace["outs"]) == 2 and namespace["future"].result().token_ids
    assert capsys.readouterr().out           # the streamed pieces


LINKS = re.findall(r"\]\(((?!https?:)[^)#]+)", TEXT)                 # [text](path)
NAMED = re.findall(r"`((?:llmopt|tools|benchmarks|notebooks|data|tests|results|\.ci)/[\w./-]*)`", TEXT)  # `path`


@pytest.mark.parametrize("path", sorted(set(LINKS + NAMED)))
def test_the_files_it_links_and_names_exist(path):
    assert (README.parent / path).exists(), f"README names {path}, which is not in the repository"
