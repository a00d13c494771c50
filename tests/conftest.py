"""Test set-up: 8 CPU devices for the multi-device tests, loud numerics."""

import chex

# Must run before JAX initialises its backends: every test module sees 8 CPU devices,
# which is how the pmap and shard_map tests run without accelerators.
chex.set_n_cpu_devices(8)

import jax  # noqa: E402

# As equinox does: no silent rank broadcasting and no implicit dtype widening, so the
# library's one deliberate widening (`kernels.accum_dtype`) is the only one there is.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

