"""Independent numpy references (float64), shared by every test module.

Written directly from the definitions, with no code from jaxsim, so that a test
comparing against them checks the math and not a copy of it.
"""

import numpy as np


def _f64(a):
  return np.asarray(a, dtype=np.float64)


def dot(x, y):
  return _f64(x) @ _f64(y).swapaxes(-1, -2)


def cosine(x, y):
  """Cosine with the zero-row convention: a zero row has cosine 0 with everything."""
  x, y = _f64(x), _f64(y)
  nx = np.linalg.norm(x, axis=-1, keepdims=True)
  ny = np.linalg.norm(y, axis=-1, keepdims=True)
  xs = np.divide(x, nx, out=np.zeros_like(x), where=nx > 0)
  ys = np.divide(y, ny, out=np.zeros_like(y), where=ny > 0)
  return xs @ ys.swapaxes(-1, -2)


def scaled_dot(x, y, scale=None):
  d = np.shape(x)[-1]
  return dot(x, y) * (1.0 / np.sqrt(d) if scale is None else scale)


def sq_euclidean(x, y):
  x, y = _f64(x), _f64(y)
  diff = x[..., :, None, :] - y[..., None, :, :]
  return np.sum(diff * diff, axis=-1)


def euclidean(x, y):
  return np.sqrt(sq_euclidean(x, y))


METRICS = {
    "dot": dot,
    "cosine": cosine,
    "scaled_dot": scaled_dot,
    "sq_euclidean": sq_euclidean,
    "euclidean": euclidean,
}
