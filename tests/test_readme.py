"""The README's quickstart runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs_as_written(capsys):
    quickstart = python_blocks()[0]
    namespace = {}
    exec(compile(quickstart, "README.md:quickstart", "exec"), namespace)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert 0 < float(printed) < 1  # one step at sigma 1.1, q = 64/1797 spends a small epsilon
    assert namespace["ledger"] != namespace["fundp"].Ledger()


def test_readme_has_exactly_two_setup_commands():
    setup = README.read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"```bash\n", setup)) == 2
