"""Test set-up: 8 CPU devices for the multi-device tests, loud numerics."""

import os

# The suite compiles many small programs and runs most of them once, so LLVM's
# optimisation of the generated machine code costs more than it saves: level 0 cut the
# Index, serving and kNN-graph tests from 83 s to 58 s on the 2-core CI machine.
# Everything XLA does to the program itself (fusion, layout, the matmul and reduction
# emitters, buffer assignment, what `memory_analysis` reports) is unchanged, and XLA's
# fast-math stays off. Machine code can still round differently in the last bit (e.g. a
# fused and an unfused form of one computation), so tests compare such forms to a
# tolerance, never bit for bit. Set `--xla_backend_optimization_level` yourself to test
# at another level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]))

import chex  # noqa: E402

# Must run before JAX initialises its backends: every test module sees 8 CPU devices,
# which is how the pmap and shard_map tests run without accelerators.
chex.set_n_cpu_devices(8)

import hypothesis  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

# The property tests draw the same examples on every run, so that a clean clone's run is
# reproducible (one run once drew a subnormal row that no other run drew);
# `pytest --hypothesis-profile=explore` draws new ones.
hypothesis.settings.register_profile("reproducible", derandomize=True)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile("reproducible")

# As equinox does: no silent rank broadcasting and no implicit dtype widening, so the
# library's one deliberate widening (`kernels.accum_dtype`) is the only one there is.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees the module's compiled programs when it ends.

  XLA:CPU maps each executable's machine code into memory mappings of its own, and
  jax's caches keep every executable alive: one worker running half the suite reached
  Linux's limit of 65530 mappings (`vm.max_map_count`) and crashed inside a compile
  (test_search.py alone leaves about 15,000 mappings).
  """
  yield
  jax.clear_caches()
