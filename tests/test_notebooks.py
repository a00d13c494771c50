"""Runs every notebook in `notebooks/` top to bottom, as CI does, and checks how it is stored.

Each notebook runs in a fresh `python3` kernel started from `notebooks/` with 8 CPU
devices (so the mesh, `pmap` and `shard_map` cells split work across several devices);
any cell that raises fails the test. The kernel must be this interpreter, or the
notebooks would test some other installation of jaxsim: a cell prepended to each run
checks that.
"""

import os
import pathlib
import re
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
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
  # The set-up cell installs jaxsim in Colab and reports the backend.
  setup = code[0].source
  for needle in ("REPO_URL", "google.colab", "jax.default_backend()", "jax.device_count()"):
    assert needle in setup, f"{path.name}: the first code cell lacks {needle}"
  badge = f"colab.research.google.com/github/jaxsim/jaxsim/blob/main/notebooks/{path.name}"
  assert any(badge in cell.source for cell in nb.cells if cell.cell_type == "markdown")


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
