"""Sphinx configuration of fundp's documentation site (furo theme, MyST Markdown, myst-nb notebooks).

Build (warnings are errors, as in the test suite's ``tests/test_docs.py``)::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

Two things are generated at build time, before Sphinx reads the sources (``_generated`` below):

* ``docs/api/<module>.rst`` — one API page per public module (every module of ``fundp`` with no
  underscore in its dotted path), with one entry per name of the module's ``__all__``.  An object
  exported by several modules is documented once, at its shortest public path (``fundp.dp_step``,
  not ``fundp.step.dp_step``); the other modules list it as a short entry pointing there, so every
  public name has an entry that a cross-reference resolves to.  ``_check_api_coverage`` then warns
  (an error under ``-W``) about any public name without an entry.
* ``docs/notebooks/*.ipynb`` — the notebooks.  The test suite executes them once
  (``tests/conftest.py``: ``executed_notebook``) and writes the executed copies to
  ``build/notebooks`` (or ``$FUNDP_EXECUTED_NOTEBOOKS``) with the SHA-256 of the source notebook;
  an executed copy whose hash matches the source is rendered as it is, and otherwise the stripped
  source is copied with ``metadata.mystnb.execution_mode = "force"``, so myst-nb executes it here,
  raising on any error.  So a notebook runs once per test session, and a plain
  ``sphinx-build`` still renders every figure.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import pathlib
import pkgutil
import re
import shutil
import sys
import types

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import fundp  # noqa: E402

project = "fundp"
author = "fundp authors"
copyright = "fundp authors, Apache-2.0"
release = version = fundp.__version__

extensions = [
    "myst_nb",  # MyST Markdown pages and notebooks (it registers myst_parser itself)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

html_theme = "furo"
html_title = f"fundp {release}"
exclude_patterns = ["_build", "_generated", "README.md", "**.ipynb_checkpoints", "jupyter_execute"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# Notebooks: rendered as copied; a notebook without a fresh executed copy carries its own
# execution_mode "force" (copy_notebooks), and an error in it fails the build.
nb_execution_mode = "off"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True

# API: autodoc from the docstrings, signatures with their type hints.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a NamedTuple's "Attributes:" as fields, not a second description of each
add_module_names = False

# A cross-reference that does not resolve is a warning (an error under -W).  Names from other
# libraries cannot resolve without intersphinx (the build is offline), so they are allowed.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|typing|typing_extensions|collections|numpy|np|optree|scipy|hypothesis|dataclasses"
               r"|enum|pathlib|os|concurrent|threading|contextlib|abc|types|functools|builtins|transformers)(\..*)?"),
    (r"py:.*", r"(Tensor|PyTree|Callable|Any|Iterator|Iterable|Sequence|Mapping|Literal|Optional|Union|Self"
               r"|NamedTuple|Path|Generator|TypeVar|ParamSpec|T|P|R|Module|nn\.Module|dtype|device|ndarray)"),
    (r"py:.*", r"(int|float|bool|str|bytes|None|object|tuple|list|dict|set|type|frozenset|Exception|ValueError"
               r"|TypeError|RuntimeError|NotImplementedError|AssertionError|ImportError|KeyError)"),
]


# ----------------------------------------------------------------------------- API pages

def public_modules() -> list[str]:
    """Every module of ``fundp`` with no ``_``-prefixed part in its dotted path, sorted."""
    names = ["fundp"]
    for info in pkgutil.walk_packages(fundp.__path__, "fundp."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def public_names(module_name: str) -> list[str]:
    """The module's ``__all__``; for a module without one, its public functions and classes defined there."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
            and getattr(value, "__module__", None) == module_name]


def _identity(module_name: str, name: str):
    value = getattr(importlib.import_module(module_name), name)
    # Constants (ints, strings) are equal across modules by value, not the same object: a
    # module-level constant is keyed by where it is documented.
    if isinstance(value, (int, float, str, bytes, tuple, frozenset)) or value is None:
        return ("value", module_name, name)
    return ("object", id(value))


def canonical_paths() -> dict[tuple[str, str], str]:
    """``(module, name) -> dotted path`` where the object is documented in full (its shortest public path)."""
    modules = public_modules()
    owner: dict[object, str] = {}
    result: dict[tuple[str, str], str] = {}
    order = sorted(modules, key=lambda m: (m.count("."), m))
    for module_name in order:
        for name in public_names(module_name):
            key = _identity(module_name, name)
            owner.setdefault(key, f"{module_name}.{name}")
    for module_name in modules:
        for name in public_names(module_name):
            result[(module_name, name)] = owner[_identity(module_name, name)]
    return result


def _role_and_directive(value) -> tuple[str, str]:
    if isinstance(value, types.ModuleType):
        return "mod", "module"
    if inspect.isclass(value):
        return ("exc", "exception") if issubclass(value, BaseException) else ("class", "class")
    if inspect.isroutine(value) or (callable(value) and hasattr(value, "__wrapped__")):
        return "func", "function"
    return "data", "data"


def _summary(value) -> str:
    """The first paragraph of the docstring, cut (between words, outside inline markup) near 150 characters."""
    text = " ".join((inspect.getdoc(value) or "").strip().split("\n\n")[0].split())
    # The summary is shown on another module's page, where the docstring's relative references
    # would not resolve: they become literals (the entry below it keeps the links).
    text = re.sub(r":[\w:]+:`~?([^`<]+?)(?: <[^>]*>)?`", r"``\1``", text)
    words, kept = text.split(" "), []
    for word in words:
        kept.append(word)
        joined = " ".join(kept)
        if len(joined) > 150 and joined.count("``") % 2 == 0 and joined.replace("``", "").count("`") % 2 == 0:
            return joined + " ..."
    return text


def _data_comment(name: str, value) -> list[str]:
    """The ``#:`` comment documenting a module-level constant, from whichever fundp module defines it."""
    from sphinx.pycode import ModuleAnalyzer

    for info in [None, *pkgutil.walk_packages(fundp.__path__, "fundp.")]:
        module_name = "fundp" if info is None else info.name
        module = importlib.import_module(module_name)
        if getattr(module, name, None) is not value:
            continue
        try:
            docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
        except Exception:  # noqa: BLE001  (no source: no comment)
            continue
        if ("", name) in docs:
            return [line for line in docs[("", name)] if line.strip() or True]
    return []


def api_page(module_name: str, canonical: dict[tuple[str, str], str]) -> str:
    module = importlib.import_module(module_name)
    parent, _, leaf = module_name.rpartition(".")
    # A module shadowed by a function of the same name in its package (``fundp.compile``) is
    # indexed as that function; the module's page is then not indexed (its docstring still shows).
    shadowed = bool(parent) and not isinstance(getattr(importlib.import_module(parent), leaf, module), types.ModuleType)
    title = f"``{module_name}``"
    lines = [title, "=" * len(title), "", f".. automodule:: {module_name}", "   :no-members:"]
    lines += ["   :no-index:", "", f".. py:currentmodule:: {module_name}", ""] if shadowed else [""]
    names = public_names(module_name)
    if not names:
        return "\n".join(lines)
    lines += [".. rubric:: Public names", "", ".. list-table::", "   :widths: 30 70", ""]
    for name in names:
        value = getattr(module, name)
        role, _ = _role_and_directive(value)
        target = value.__name__ if role == "mod" else canonical[(module_name, name)]
        summary = "" if role == "data" else _summary(value)
        lines += [f"   * - :py:{role}:`~{target}`", f"     - {summary}" if summary else "     -"]
    lines.append("")
    for name in names:
        value = getattr(module, name)
        role, directive = _role_and_directive(value)
        if role == "mod":
            continue  # the entry is the module's own page
        home = canonical[(module_name, name)]
        if home == f"{module_name}.{name}":
            if directive == "data":
                lines += [f".. py:data:: {name}", f"   :module: {module_name}", ""]
                lines += ["   " + line if line.strip() else "" for line in _data_comment(name, value)]
                lines += [f"   Value: ``{_short_repr(value)}``", ""]
                continue
            auto = {"function": "autofunction", "class": "autoclass", "exception": "autoexception"}[directive]
            lines += [f".. {auto}:: {module_name}::{name}"]
            if directive in ("class", "exception"):
                lines += ["   :members:"]
            lines.append("")
        else:
            lines += [f".. py:{directive}:: {name}", f"   :module: {module_name}", "   :no-contents-entry:", "",
                      f"   The same object as :py:{role}:`{home}` (documented there).", ""]
    return "\n".join(lines)


def _short_repr(value) -> str:
    text = repr(value).replace("\n", " ")
    if len(text) > 100 or "``" in text:
        text = f"<{type(value).__name__}>"
    return text


def write_api_pages() -> list[str]:
    out = DOCS / "api"
    canonical = canonical_paths()
    modules = public_modules()
    for stale in out.glob("fundp*.rst"):
        stale.unlink()
    for module_name in modules:
        (out / f"{module_name}.rst").write_text(api_page(module_name, canonical))
    return modules


# ----------------------------------------------------------------------------- notebooks

def source_hash(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def executed_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FUNDP_EXECUTED_NOTEBOOKS", ROOT / "build" / "notebooks"))


def copy_notebooks() -> None:
    """Puts each notebook in ``docs/notebooks``: its executed copy when fresh, else the stripped
    source marked for execution (``metadata.mystnb.execution_mode = "force"``)."""
    out = DOCS / "notebooks"
    out.mkdir(exist_ok=True)
    for stale in out.glob("*.ipynb"):
        stale.unlink()
    for source in sorted((ROOT / "notebooks").glob("*.ipynb")):
        executed = executed_dir() / source.name
        if executed.exists():
            metadata = json.loads(executed.read_text()).get("metadata", {})
            if metadata.get("fundp", {}).get("source_sha256") == source_hash(source):
                shutil.copyfile(executed, out / source.name)
                continue
        notebook = json.loads(source.read_text())
        notebook.setdefault("metadata", {})["mystnb"] = {"execution_mode": "force"}
        (out / source.name).write_text(json.dumps(notebook, indent=1) + "\n")


# ----------------------------------------------------------------------------- coverage check

def _check_api_coverage(app, env) -> None:
    """Warns (an error under -W) about a public module without a page or a public name without an entry."""
    from sphinx.util import logging

    logger = logging.getLogger("fundp.docs")
    objects = env.get_domain("py").objects
    for module_name in public_modules():
        if f"api/{module_name}" not in env.found_docs:
            logger.warning("public module %s has no API page", module_name)
        for name in public_names(module_name):
            value = getattr(importlib.import_module(module_name), name)
            if isinstance(value, types.ModuleType):
                if f"api/{value.__name__}" not in env.found_docs:
                    logger.warning("public name %s.%s: module %s has no API page", module_name, name, value.__name__)
            elif f"{module_name}.{name}" not in objects:
                logger.warning("public name %s.%s has no API entry", module_name, name)


def _resolve(dotted: str):
    """The object at ``dotted`` (a module, or attributes of one), or ``None`` when there is none."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if hasattr(value, part):
                value = getattr(value, part)
            elif part in getattr(value, "__annotations__", {}) or _sets_attribute(value, part):
                value = object()  # a dataclass / NamedTuple field, or an instance attribute
            else:
                return None
        return value
    return None


def _sets_attribute(cls, name: str) -> bool:
    """Whether class ``cls``'s source assigns ``self.<name>`` (an instance attribute)."""
    if not inspect.isclass(cls):
        return False
    try:
        return re.search(rf"self\.{name}\s*(:[^=]*)?=", inspect.getsource(cls)) is not None
    except (OSError, TypeError):
        return False


def _existing_internal(app, env, node, contnode):
    """Resolves what Python would, for references Sphinx's own lookup missed; else leaves them broken.

    Sphinx calls this only for a reference it could not resolve.  Three cases are resolved:

    * a docstring rendered away from its module (``fundp.dp_step`` is documented at ``fundp``,
      its docstring lives in ``fundp.step``): the target is looked up again from the module the
      docstring comes from, and links to the entry found there;
    * a real but undocumented (private) object of fundp renders as plain text;
    * a "type" with spaces in it (a napoleon field's prose, ``[B] bools``) is prose, not a name.

    A target that exists nowhere (a typo, a renamed function) stays unresolved, so ``nitpicky``
    reports it and ``-W`` fails the build.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    if " " in target.strip():
        return contnode
    module, cls = node.get("py:module") or "", node.get("py:class") or ""
    source = str(node.source or "")
    if "docstring of " in source:
        documented = _resolve(source.split("docstring of ", 1)[1].split(":")[0])
        home = getattr(documented, "__module__", None) if not isinstance(documented, types.ModuleType) else None
        if home and home != module:
            retry = node.deepcopy()
            retry["py:module"] = home
            domain = env.get_domain("py")
            found = domain.resolve_xref(env, node.get("refdoc", ""), app.builder, node["reftype"], node["reftarget"],
                                        retry, contnode)
            if found is not None:
                return found
            module = home
    candidates = [target]
    if module:
        candidates += [f"{module}.{target}"] + ([f"{module}.{cls}.{target}"] if cls else [])
    for candidate in candidates:
        if candidate.startswith("fundp") and _resolve(candidate) is not None:
            return contnode
    return None


def write_refused_table() -> None:
    """``docs/_generated/refused.md``: the refused pairs of :data:`fundp.guards.UNSUPPORTED`."""
    from fundp.guards import UNSUPPORTED

    rows = ["| option | with | raises | why |", "|---|---|---|---|"]
    for (first, second), (error, reason) in UNSUPPORTED.items():
        why = reason.replace("|", r"\|")
        rows.append(f"| `{first}` | `{second}` | `{error.__name__}` | {why} |")
    out = DOCS / "_generated"
    out.mkdir(exist_ok=True)
    (out / "refused.md").write_text("\n".join(rows) + "\n")


def _generate(app) -> None:
    write_api_pages()
    write_refused_table()
    copy_notebooks()


def setup(app):
    app.connect("builder-inited", _generate)
    app.connect("env-check-consistency", _check_api_coverage)
    app.connect("missing-reference", _existing_internal)
    return {"parallel_read_safe": True}
