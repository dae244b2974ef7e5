"""The documentation site builds with warnings as errors, covers every public name, and the README's
links into it resolve.

The build (``sphinx-build -W --keep-going``, ``nitpicky``: a broken cross-reference, a public name
without an API entry (``docs/conf.py``'s coverage hook) or a notebook that fails is an error)
renders the notebooks executed by ``tests/notebook_runs.py`` -- the same single execution that
``tests/test_notebooks.py`` checks -- so no notebook runs twice in a session.  The checks below read
the *built* site (its ``objects.inv`` and HTML pages), independently of the hook that warned.
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest
from sphinx.util.inventory import InventoryFile

from notebook_runs import NOTEBOOKS, ROOT, executed, executed_dir

DOCS = ROOT / "docs"
README = ROOT / "README.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")

# The module's first test builds the site, and runs the notebooks when test_notebooks has not yet
# (each runs once per session): minutes on a 2-core CPU, over the suite's default 600 s per test.
pytestmark = pytest.mark.timeout(1800)


_BUILT: list[pathlib.Path] = []  # the site, built once per process (also if pytest sets the
# module fixture up again, as a pytest-xdist worker can)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Builds the site once per process; returns the HTML output directory."""
    if not _BUILT:
        _BUILT.append(build_site(tmp_path_factory))
    return _BUILT[0]


def build_site(tmp_path_factory) -> pathlib.Path:
    for path in NOTEBOOKS:
        executed(path)  # once per session: a failing notebook fails here, as in test_notebooks
    out = tmp_path_factory.mktemp("docs") / "html"
    env = {**os.environ, "FUNDP_EXECUTED_NOTEBOOKS": str(executed_dir()), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(out.parent / "doctrees"),
         str(DOCS), str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert result.returncode == 0, f"sphinx-build failed (warnings are errors):\n{result.stderr[-6000:]}"
    # The notebooks were executed above, once: the build renders those copies and runs none again.
    assert "Executing notebook" not in result.stdout + result.stderr, "the docs build executed a notebook again"
    return out


def public_entries() -> list[str]:
    """Every ``module.name`` of every public module's ``__all__`` (its public classes and functions without one)."""
    spec = importlib.util.spec_from_file_location("fundp_docs_conf", DOCS / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    entries = []
    for module_name in conf.public_modules():
        entries.append(module_name)
        for name in conf.public_names(module_name):
            value = getattr(importlib.import_module(module_name), name)
            entries.append(value.__name__ if isinstance(value, types.ModuleType) else f"{module_name}.{name}")
    return entries


def missing_entries(entries: list[str], inventory: dict) -> list[str]:
    """The entries no page of the inventory documents (a module has its own page, ``api/<module>``)."""
    documented = {name for objects in inventory.values() for name in objects}
    pages = {uri.split("#")[0] for objects in inventory.values() for uri in objects.values()}
    return [entry for entry in entries if entry not in documented and f"api/{entry}.html" not in pages]


def read_inventory(site: pathlib.Path) -> dict:
    with open(site / "objects.inv", "rb") as stream:
        inventory = InventoryFile.load(stream, "", lambda base, uri: uri)
    # Sphinx >= 8.2 returns an _Inventory of _InventoryItem objects; older versions dicts of tuples.
    data = getattr(inventory, "data", inventory)
    return {kind: {name: getattr(item, "uri", None) or item[2] for name, item in objects.items()}
            for kind, objects in data.items()}


def test_every_public_name_has_an_api_entry(site):
    entries = public_entries()
    assert "fundp.dp_step" in entries and "fundp.testing.assert_matches_vmap" in entries and len(entries) > 300
    assert missing_entries(entries, read_inventory(site)) == []


def test_the_coverage_check_can_fail(site):
    inventory = read_inventory(site)
    pruned = {kind: {name: item for name, item in objects.items() if name != "fundp.step.privatize"}
              for kind, objects in inventory.items()}
    assert missing_entries(["fundp.step.privatize", "fundp.dp_step"], pruned) == ["fundp.step.privatize"]


def test_notebooks_are_rendered_with_their_figures(site):
    for path in NOTEBOOKS:
        page = (site / "notebooks" / f"{path.stem}.html").read_text()
        images = re.findall(r'<img[^>]+src="([^"]+\.png)"', page)
        figures = sum("image/png" in output.get("data", {}) for cell in executed(path).cells
                      for output in cell.get("outputs", []))
        assert figures > 0 and len(images) >= figures, f"{path.name}: {len(images)} images shown, {figures} figures made"
        assert all((site / "notebooks" / src).resolve().exists() for src in images), path.name
        assert "Traceback" not in page and "CellExecutionError" not in page, path.name


def link_problems(markdown: str, site: pathlib.Path) -> list[str]:
    """Relative links of a Markdown file at the repository root that do not resolve.

    A link to ``docs/<page>.md`` must have a built page ``<page>.html`` (and its ``#anchor`` an
    element with that id); any other relative link must name an existing file.
    """
    problems = []
    for target in LINK.findall(markdown):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        if path.startswith("docs/") and path.endswith(".md"):
            page = site / (path[len("docs/"):-len(".md")] + ".html")
            if not page.exists():
                problems.append(f"{target}: no built page {page.name}")
            elif anchor and f'id="{html.escape(anchor)}"' not in page.read_text():
                problems.append(f"{target}: no #{anchor} in {page.name}")
        elif path and not (ROOT / path).exists():
            problems.append(f"{target}: no such file")
    return problems


def test_readme_links_resolve_to_built_pages(site):
    text = README.read_text()
    assert len(LINK.findall(text)) >= 10  # the table of links into the docs
    assert link_problems(text, site) == []
    broken = "[a](docs/no-such-page.md) [b](docs/concepts.md#no-such-section) [c](no/such/file.py)"
    assert len(link_problems(broken, site)) == 3


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


def test_the_benchmarks_page_renders_results(site):
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    first_heading = re.search(r"^## (.+)$", results, re.M).group(1)
    page = html.unescape(re.sub(r"<[^>]+>", "", (site / "benchmarks.html").read_text()))
    assert first_heading.split(" — ")[0].replace("`", "") in page
