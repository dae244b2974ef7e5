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


def test_readme_support_table_lists_exactly_the_guards_refused_pairs():
    """The README's support table (<= 15 lines) names every pair of fundp.guards.UNSUPPORTED and
    no other in its "refused (`UNSUPPORTED`)" rows (the first name, then "+ `partner`" each), so
    adding or removing a refusal without the README fails here; the README stays <= 200 lines."""
    from fundp.guards import UNSUPPORTED

    text = README.read_text()
    section = text.split("## What a step accepts", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert 5 <= len(rows) <= 15
    listed = set()
    for row in rows:
        if "refused (`UNSUPPORTED`):" in row:
            first, *partners = re.findall(r"`([^`]+)`", row.split("refused (`UNSUPPORTED`):", 1)[1])
            listed |= {frozenset((first, partner)) for partner in partners}
    assert listed == {frozenset(pair) for pair in UNSUPPORTED}
    assert len(text.splitlines()) <= 200
