"""Input checks shared by every public function: dtype, rank and feature dims.

Checks run on static shapes and dtypes only, so they cost nothing under `jit` and
work the same on tracers and concrete arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def _from_torch(value):
  """A torch tensor as something `numpy.asarray` or DLPack can read, without torch.

  Tensors that require grad are detached (jaxsim does not differentiate through
  torch), and dtypes numpy lacks (bfloat16) cross through DLPack.
  """
  if getattr(value, "requires_grad", False):
    value = value.detach()
  if str(getattr(value, "dtype", "")) == "torch.bfloat16":
    return jnp.from_dlpack(value.cpu().contiguous())
  return value


def is_torch(value) -> bool:
  return type(value).__module__.startswith("torch")


def torch_to_numpy(value) -> np.ndarray:
  """A (CPU or device) torch tensor as a host numpy array, detached; bfloat16, which
  numpy lacks, as float32. For the host-side paths (an `Index`'s host store, a
  process's own rows, fingerprints of replicated inputs)."""
  value = value.detach().cpu()
  if str(value.dtype) == "torch.bfloat16":
    value = value.float()
  return value.numpy()


def as_float_array(value: ArrayLike, name: str) -> jax.Array | np.ndarray:
  """Returns `value` as a real floating array of a dtype JAX uses, promoting integers.

  Arrays that are already floating in a dtype JAX keeps pass through untouched (no
  copy, no device transfer), which keeps eager calls cheap. Float64 numpy arrays
  become float32 unless `jax_enable_x64` is on, here, on the host, so that no
  "explicitly requested dtype float64" warning is raised later. Torch tensors are
  accepted: detached if they require grad, through DLPack if numpy has no such dtype.

  Raises:
    TypeError: if `value` is not array-like, or is complex or non-numeric.
  """
  if is_torch(value):
    value = _from_torch(value)
  if isinstance(value, jax.Array):
    dtype = value.dtype
  else:
    if isinstance(value, (str, bytes)) or value is None:
      raise TypeError(f"`{name}` must be an array, got {type(value).__name__}.")
    try:
      value = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as err:
      raise TypeError(f"`{name}` must be array-like, got {type(value).__name__}: {err}") from None
    dtype = value.dtype
    if dtype.kind == "f" or jnp.issubdtype(dtype, jnp.floating):
      # float64 -> float32 without x64 (Python floats are float64 to numpy too).
      canonical = jax.dtypes.canonicalize_dtype(dtype)
      if canonical != dtype:
        value = value.astype(canonical)
        dtype = value.dtype
  if dtype.kind == "f":
    return value
  if dtype.kind in "iub":
    # The default float: float32, or float64 under `jax_enable_x64`.
    return jnp.asarray(value, jax.dtypes.canonicalize_dtype(jnp.float64))
  if dtype.kind == "c":
    raise TypeError(f"`{name}` must be real, got complex dtype {dtype}.")
  if jnp.issubdtype(dtype, jnp.floating):  # bfloat16 and friends report kind "V"
    return value
  raise TypeError(f"`{name}` must be a numeric array, got dtype {dtype}.")


def check_rank(arr: jax.Array, name: str, *, min_rank: int = 1, max_rank: int | None = None):
  if arr.ndim < min_rank or (max_rank is not None and arr.ndim > max_rank):
    want = f"at least {min_rank}" if max_rank is None else (
        f"{min_rank}" if min_rank == max_rank else f"{min_rank} to {max_rank}")
    raise ValueError(
        f"`{name}` must have rank {want}, got shape {arr.shape} (rank {arr.ndim}).")


def pair(x: ArrayLike, y: ArrayLike | None, *, x_name: str = "x",
         y_name: str = "y") -> tuple[jax.Array, jax.Array | None]:
  """Validates a `(..., n, d)` / `(..., m, d)` pair of row sets.

  Returns:
    `(x, y)` as floating arrays of a common dtype; `y` stays `None` when absent.

  Raises:
    TypeError: on complex or non-numeric inputs.
    ValueError: on rank-0 inputs, mismatched feature dims or batch dims that do not
      broadcast.
  """
  x = as_float_array(x, x_name)
  check_rank(x, x_name)
  if y is None:
    return x, None
  y = as_float_array(y, y_name)
  check_rank(y, y_name)
  if x.shape[-1] != y.shape[-1]:
    raise ValueError(
        f"`{x_name}` and `{y_name}` must have the same feature dim (last axis), got "
        f"{x_name}.shape={x.shape} and {y_name}.shape={y.shape}.")
  try:
    np.broadcast_shapes(x.shape[:-2], y.shape[:-2])
  except ValueError:
    raise ValueError(
        f"Batch dims of `{x_name}` and `{y_name}` do not broadcast: "
        f"{x_name}.shape={x.shape}, {y_name}.shape={y.shape}.") from None
  if x.dtype != y.dtype:
    # Mixed inputs widen as JAX's standard promotion would, explicitly, so that this
    # also holds under `jax_numpy_dtype_promotion="strict"`.
    with jax.numpy_dtype_promotion("standard"):
      dtype = jnp.promote_types(x.dtype, y.dtype)
    x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
  return x, y


def matrices(x: ArrayLike, y: ArrayLike | None, *, x_name: str = "x",
             y_name: str = "y") -> tuple[jax.Array, jax.Array | None]:
  """`pair` for the streamed reductions, which take 2-D `(n, d)` / `(m, d)` row sets."""
  x, y = pair(x, y, x_name=x_name, y_name=y_name)
  check_rank(x, x_name, min_rank=2, max_rank=2)
  if y is not None:
    check_rank(y, y_name, min_rank=2, max_rank=2)
  return x, y


def block_sizes(block_size, query_block_size) -> tuple[int | None, int | None]:
  """Checks the corpus and query block sizes that the streamed reductions take."""
  return (check_positive_int(block_size, "block_size", allow_none=True),
          check_positive_int(query_block_size, "query_block_size", allow_none=True))


def check_positive_int(value, name: str, *, allow_none: bool = False,
                       maximum: int | None = None) -> int | None:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  if maximum is not None and value > maximum:
    raise ValueError(f"`{name}` must be at most {maximum}, got {value!r}.")
  return int(value)


def check_bool(value, name: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool, got {value!r}.")
  return bool(value)


def check_scalar(value, name: str, *, allow_nan: bool = False):
  """A real scalar option (a Python number or a 0-d array, traced or not).

  Raises:
    TypeError: for a string, bool, None, complex or other non-real value.
    ValueError: for a non-scalar array, or a NaN (unless `allow_nan`); a traced value
      is checked for shape and dtype only.
  """
  if type(value) is int:  # The common cases, checked first: eager calls add up.
    return value
  if type(value) is float:
    if value != value and not allow_nan:
      raise ValueError(f"`{name}` must not be NaN.")
    return value
  if value is None or isinstance(value, (str, bytes, bool, np.bool_)):
    raise TypeError(f"`{name}` must be a real number, got {value!r}.")
  if np.ndim(value) != 0:
    raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(value)}.")
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    try:
      dtype = np.result_type(value)
    except TypeError:
      raise TypeError(f"`{name}` must be a real number, got {value!r}.") from None
  if dtype.kind not in "iuf" and not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`{name}` must be a real number, got {value!r}.")
  if not allow_nan and not isinstance(value, jax.core.Tracer) and np.isnan(
      np.asarray(value, np.float64)):
    raise ValueError(f"`{name}` must not be NaN.")
  return value


def canonical_scalar(value, dtype) -> jax.Array:
  """A scalar option as a 0-d array of `dtype`: passed to `jit` as an argument, so that
  a new value reuses the compiled program instead of compiling another one."""
  if isinstance(value, jax.Array) and value.dtype == dtype:
    return value
  return jnp.asarray(value, dtype)
