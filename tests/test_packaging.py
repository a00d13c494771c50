"""The distributions: a wheel with only `jaxsim` (typed, licensed) and an sdist whose tests run.

Both are built offline from a copy of the checkout, with the setuptools of this
environment (the `test` extra asks for one that reads the SPDX `license` string), so the
checkout itself gains no `build/` or `.egg-info`.
"""

import email
import email.policy
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import jaxsim

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NAME = PYPROJECT["project"]["name"]
# What the sdist's tests need beside the package: the suite's helpers (conftest.py,
# reference.py), and the experiments and notebooks that some tests run.
SDIST_TREES = ("tests", "experiments", "notebooks")


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, pathlib.Path]:
  pytest.importorskip("setuptools", minversion="77")
  src = tmp_path_factory.mktemp("src") / "checkout"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".git", ".venv", "build", "dist", "results", "*.egg-info", "__pycache__",
      ".pytest_cache", ".hypothesis", ".ipynb_checkpoints"))
  out = tmp_path_factory.mktemp("wheelhouse")
  subprocess.run(
      [sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
       "out = sys.argv[1]; b.build_sdist(out); b.build_wheel(out)", str(out)],
      cwd=src, check=True, capture_output=True, text=True)
  (sdist,) = out.glob("*.tar.gz")
  (wheel,) = out.glob("*.whl")
  return {"sdist": sdist, "wheel": wheel}


def _metadata(wheel: pathlib.Path):
  with zipfile.ZipFile(wheel) as zf:
    (path,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(zf.read(path), policy=email.policy.compat32)


def test_wheel_holds_the_typed_licensed_package_only(dists):
  with zipfile.ZipFile(dists["wheel"]) as zf:
    names = zf.namelist()
  assert "jaxsim/py.typed" in names
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
  top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert top == {"jaxsim"}, top  # never the tests or experiments as top-level packages


def test_wheel_metadata(dists):
  meta = _metadata(dists["wheel"])
  assert meta["Name"] == NAME != "jaxsim"  # `jaxsim` on the index is another project
  assert meta["Version"] == jaxsim.__version__  # one place: jaxsim/__init__.py
  assert meta["License-Expression"] == "Apache-2.0"
  assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
  requires = meta.get_all("Requires-Dist")
  core = sorted(r.split(">=")[0] for r in requires if "extra ==" not in r)
  assert core == ["chex", "jax", "jaxlib", "numpy", "optax"]
  # No exact pins for users: the CPU torch pin lives in constraints/ci.txt.
  assert not [r for r in requires if "==" in r.split(";")[0]], requires
  assert any(r.startswith("torch>=") and 'extra == "bench"' in r for r in requires)
  assert "torch==" in (ROOT / "constraints" / "ci.txt").read_text()


def test_installed_version_is_the_package_version():
  from importlib import metadata

  try:
    installed = metadata.version(NAME)
  except metadata.PackageNotFoundError:
    pytest.skip(f"{NAME} is not installed here (jaxsim is imported from the source tree)")
  assert installed == jaxsim.__version__


def test_sdist_tests_collect_and_run(dists, tmp_path):
  with tarfile.open(dists["sdist"]) as tf:
    # The "data" filter (Python >= 3.11.4) refuses links and paths out of tmp_path.
    tf.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
  (unpacked,) = tmp_path.iterdir()
  for tree in SDIST_TREES:
    expected = {p.relative_to(ROOT) for p in (ROOT / tree).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
                and ".ipynb_checkpoints" not in p.parts}
    shipped = {p.relative_to(unpacked) for p in (unpacked / tree).rglob("*") if p.is_file()}
    assert expected <= shipped, sorted(map(str, expected - shipped))
  assert (unpacked / "LICENSE").is_file() and (unpacked / "jaxsim" / "py.typed").is_file()
  # The unpacked suite, with its own copy of jaxsim, conftest.py and reference.py:
  # every test module collects, and some of one module's tests run.
  def pytest_in_sdist(*args):
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                         cwd=unpacked, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout.strip().splitlines()[-1]

  collected = pytest_in_sdist("--collect-only", "tests")
  assert "error" not in collected and "tests collected" in collected, collected
  assert " passed" in pytest_in_sdist("tests/test_blockscan.py", "-k", "block_map")
