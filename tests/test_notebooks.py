"""Runs every notebook in `notebooks/` top to bottom, as CI does, and checks how it is stored.

Each notebook runs in a fresh `python3` kernel started from `notebooks/` with 8 CPU
devices (so the mesh, `pmap` and `shard_map` cells split work across several devices);
any cell that raises fails the test. The kernel must be this interpreter, or the
notebooks would test some other installation of jaxsim: a cell prepended to each run
checks that. The notebooks open in Colab from a badge, so their links, their set-up
cell and its failure (a plain message, no traceback) are checked too.
"""

import os
import pathlib
import re
import sys
import tomllib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {"quickstart", "attention_and_embeddings"}
CELL_TIMEOUT_S = 300
DEVICES = 8

ids = [path.stem for path in NOTEBOOKS]


def test_expected_notebooks_exist():
  assert EXPECTED <= {path.stem for path in NOTEBOOKS}, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_stored_clean(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code, f"{path.name} has no code cells"
  for i, cell in enumerate(code):
    assert cell.outputs == [], f"{path.name}: code cell {i} is stored with outputs"
    assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"
  # The set-up cell installs jaxsim from one setting, named on its first code line,
  # and reports the backend.
  setup = code[0].source
  first = next(line for line in setup.splitlines() if line and not line.startswith("#"))
  assert first.startswith("JAXSIM_SOURCE = "), f"{path.name}: first setting is {first!r}"
  for needle in ("SetupError", "jax.default_backend()", "jax.device_count()"):
    assert needle in setup, f"{path.name}: the first code cell lacks {needle}"
  # Installed from JAXSIM_SOURCE, the package has no experiments/: nothing may import it.
  for i, cell in enumerate(code):
    assert not re.search(r"^\s*(from|import) experiments", cell.source, re.M), (
        f"{path.name}: code cell {i} imports the repository's experiments/")
  owner_repo = REPOSITORY.removeprefix("https://github.com/")
  badge = f"colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name}"
  assert any(badge in cell.source for cell in nb.cells if cell.cell_type == "markdown")
  assert f'JAXSIM_SOURCE = "git+{REPOSITORY}"' in setup


def test_readme_badges_open_these_notebooks():
  readme = (ROOT / "README.md").read_text()
  owner_repo = REPOSITORY.removeprefix("https://github.com/")
  badges = set(re.findall(r"colab\.research\.google\.com/github/([^)\s]+)", readme))
  assert badges == {f"{owner_repo}/blob/main/notebooks/{path.name}" for path in NOTEBOOKS}
  assert f"git+{REPOSITORY}" in readme  # the README's install line names the same repository


def test_setup_cells_are_one():
  setups = {path.stem: _setup_cell(path) for path in NOTEBOOKS}
  assert len(set(setups.values())) == 1, "the notebooks' set-up cells differ"


def _setup_cell(path) -> str:
  nb = nbformat.read(path, as_version=4)
  return next(cell.source for cell in nb.cells if cell.cell_type == "code")


def _kernel_env() -> dict[str, str]:
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES} {flags}".strip()
  # The kernel's own inline backend shows the figures; a backend set for scripts
  # (MPLBACKEND=Agg) would only make plt.show() warn.
  env.pop("MPLBACKEND", None)
  return env


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_runs_top_to_bottom(path):
  from nbclient import NotebookClient

  nb = nbformat.read(path, as_version=4)
  probe = nbformat.v4.new_code_cell(
      "import sys, jax\nprint(sys.executable)\nprint(jax.device_count())")
  nb.cells.insert(0, probe)
  client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": str(path.parent)}})
  client.execute(env=_kernel_env())  # raises CellExecutionError on the first failing cell
  out = "".join(o.get("text", "") for o in probe.outputs if o.output_type == "stream")
  executable, devices = out.split()
  assert executable == sys.executable, (
      f"the python3 kernel ran {executable}, not this interpreter {sys.executable}")
  assert int(devices) == DEVICES


@pytest.mark.slow
def test_setup_stops_with_a_plain_message_when_jaxsim_cannot_be_installed(tmp_path):
  """A runtime without jaxsim and a JAXSIM_SOURCE that pip cannot install: the set-up cell
  stops the notebook with one plain message naming the setting, not a traceback."""
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError

  source = str(tmp_path / "jax_similarity-0.0.0-py3-none-any.whl")  # no such file
  setup, count = re.subn(r'^JAXSIM_SOURCE = ".*"$', f"JAXSIM_SOURCE = {source!r}",
                         _setup_cell(NOTEBOOKS[0]), flags=re.M)
  assert count == 1
  nb = nbformat.v4.new_notebook(cells=[
      # As in a fresh runtime: `import jaxsim` fails and find_spec finds nothing.
      nbformat.v4.new_code_cell("import sys\nsys.modules['jaxsim'] = None"),
      nbformat.v4.new_code_cell(setup),
      nbformat.v4.new_code_cell("print('ran on')"),
  ])
  client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": str(tmp_path)}})
  with pytest.raises(CellExecutionError):
    client.execute(env=_kernel_env())
  errors = [o for o in nb.cells[1].outputs if o.output_type == "error"]
  assert len(errors) == 1, nb.cells[1].outputs
  (error,) = errors
  assert error.ename == "SetupError"
  (message,) = error.traceback  # one rendered line: no frames, no source
  assert message.startswith("Set-up stopped: jaxsim could not be installed"), message
  assert "Set JAXSIM_SOURCE" in message and source in message
  assert "Traceback" not in message and "File " not in message
  assert nb.cells[2].outputs == []  # the run stopped there
