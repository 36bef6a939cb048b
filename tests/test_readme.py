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


def _names_used():
    """Every dotted `llmopt.name...` the README, the notebooks and the library's own text use."""
    root = README.parent
    files = [README, *sorted(root.glob("notebooks/*.ipynb")), *sorted(root.glob("llmopt/*.py"))]
    found: dict[str, str] = {}
    for f in files:
        for m in re.finditer(r"(?<![\w/.])llmopt(?:\.[A-Za-z_]\w*)+(\()?", f.read_text()):
            found.setdefault(m.group(0), f.relative_to(root).as_posix())     # "llmopt.x.y(" where it is called
    return sorted(found.items())


@pytest.mark.parametrize("name, where", _names_used())
def test_every_llmopt_name_the_docs_use_exists(name, where):
    """What a reader types as written works: `llmopt.generate.Session` did not (`llmopt.generate` is the
    function), nor the `llmopt.quantize(model, "int8")` the library's own messages advised (a module)."""
    import llmopt
    obj = llmopt
    for part in name.rstrip("(").split(".")[1:]:
        assert hasattr(obj, part), f"{where} names {name}, but {part!r} is not an attribute of {obj!r:.60}"
        obj = getattr(obj, part)
    assert callable(obj) or not name.endswith("("), f"{where} calls {name}), but that is {obj!r:.60}"
