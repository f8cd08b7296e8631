"""The README's code example runs as written (it is what researchers copy first)."""

import pathlib
import re


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

def test_readme_python_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md lost its python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["per_example"].shape == (4,)
    assert namespace["dice"].shape == (4, 2)
    assert namespace["hd95"] >= 0.0  # a float, possibly inf (the untrained net may predict nothing)

def test_readme_setup_commands_match_ci():
    lines = README.read_text().splitlines()
    first_cmds = [line for line in lines[:20] if line.startswith(("pip ", "python "))]
    assert first_cmds[:2] == ["pip install -e '.[test]'", "python -m pytest -n 2 tests"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert first_cmds[0] in ci and first_cmds[1] in ci
