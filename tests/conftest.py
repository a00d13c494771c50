"""Test set-up: 8 CPU devices for the multi-device tests, loud numerics."""

import chex

# Must run before JAX initialises its backends: every test module sees 8 CPU devices,
# which is how the pmap and shard_map tests run without accelerators.
chex.set_n_cpu_devices(8)

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
