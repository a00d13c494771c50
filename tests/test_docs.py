"""The API reference: pdoc builds it from the docstrings, as `make docs` does.

The build runs under the suite's warnings-as-errors, so a docstring pdoc cannot read
fails here. The page must hold every public name with its docstring, its math rendered
for MathJax (no raw `:math:` left) and its doctest examples shown.
"""

import html
import inspect
import re

import pytest

import jaxsim

pdoc = pytest.importorskip("pdoc", reason="the API reference needs the `docs` extra")

# Public functions written before examples were required; any other public function
# must show one. Remove a name from here once its docstring has an `Examples:` section.
WITHOUT_EXAMPLES = frozenset({"euclidean", "pairwise", "scaled_dot", "sq_euclidean"})


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
  import pdoc.render

  out = tmp_path_factory.mktemp("docs")
  # The options of the Makefile's `docs` target.
  pdoc.render.configure(docformat="google", math=True)
  pdoc.pdoc("jaxsim", output_directory=out)
  assert (out / "index.html").is_file()
  return (out / "jaxsim.html").read_text(encoding="utf-8")


def _docstring_html(page: str, name: str) -> str:
  section = re.search(rf'<section id="{re.escape(name)}">(.*?)</section>', page, re.S)
  assert section, f"{name} is missing from the API reference"
  doc = re.search(r'<div class="docstring">(.*)', section.group(1), re.S)
  assert doc, f"{name} has no docstring in the API reference"
  return doc.group(1)


@pytest.mark.parametrize("name", jaxsim.__all__)
def test_every_public_name_is_documented(page, name):
  doc = _docstring_html(page, name)
  summary = inspect.getdoc(getattr(jaxsim, name)).splitlines()[0]
  # The first words of the summary line, as rendered (code spans and escapes aside).
  words = re.sub(r"[`*]", "", summary).split()[:3]
  text = html.unescape(re.sub(r"<[^>]+>", "", doc))
  assert " ".join(words) in " ".join(text.split()), (name, words)


@pytest.mark.parametrize("name", jaxsim.__all__)
def test_math_is_rendered(page, name):
  source = inspect.getdoc(getattr(jaxsim, name))
  doc = _docstring_html(page, name)
  assert ":math:" not in doc and ".. math::" not in doc, f"{name}: raw reST math left"
  if ":math:" in source or ".. math::" in source:
    assert "\\(" in doc or "$$" in doc, f"{name}: its math was not converted for MathJax"


def test_mathjax_is_loaded(page):
  assert "MathJax" in page


@pytest.mark.parametrize("name", jaxsim.__all__)
def test_examples_are_shown(page, name):
  obj = getattr(jaxsim, name)
  source = inspect.getdoc(obj)
  doc = _docstring_html(page, name)
  if ">>>" in source:
    # Rendered as a highlighted code block whose prompt pdoc keeps.
    assert "&gt;&gt;&gt;" in doc and "codehilite" in doc, f"{name}: example not shown"
  elif inspect.isfunction(obj) and name not in WITHOUT_EXAMPLES:
    pytest.fail(f"public function {name} has no doctest example")
