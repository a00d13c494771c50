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


def cosine_clamped(x, y, eps):
  """Cosine with optax's `epsilon`: each row divided by `sqrt(max(|x|^2, eps))`."""
  x, y = _f64(x), _f64(y)
  nx = np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), eps))
  ny = np.sqrt(np.maximum(np.sum(y * y, axis=-1, keepdims=True), eps))
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


def normal_rows(seed, *shapes, dtype=np.float32):
  """Standard normal rows of each shape, from one seeded generator."""
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(s).astype(dtype) for s in shapes]


def int_rows(seed, *shapes, values=(-1, 0, 1)):
  """Small-integer rows: every dot product is exact in float32, so ties are exact too."""
  rng = np.random.default_rng(seed)
  return [rng.choice(np.asarray(values, np.float32), size=s) for s in shapes]


def near_duplicates(seed, *, d=128, n=512, scale=10.0, dtype=np.float32):
  """`(query, corpus)`: a `(1, d)` query and `n` rows, the last ten at distances
  1e-4 ... 1e-3 of it (nearest last), the others random at distances ~ scale * sqrt(2d).

  Float32 rows whose differences with the query are far below the rows' norms: the
  expansion |x|^2 + |y|^2 - 2 x.y cannot resolve them."""
  rng = np.random.default_rng(seed)
  query = (rng.standard_normal((1, d)) * scale).astype(dtype)
  dirs = rng.standard_normal((10, d))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  near = (_f64(query) + dirs * np.linspace(1e-3, 1e-4, 10)[:, None]).astype(dtype)
  far = (rng.standard_normal((n - 10, d)) * scale).astype(dtype)
  return query, np.concatenate([far, near])


METRICS = {
    "dot": dot,
    "cosine": cosine,
    "scaled_dot": scaled_dot,
    "sq_euclidean": sq_euclidean,
    "euclidean": euclidean,
}


# --- Blocked reductions (jaxsim.topk, jaxsim.pairs_above, jaxsim.similarity_stats) ---------
# Brute force over a full float64 score matrix from the references above.

DISTANCES = ("sq_euclidean", "euclidean")


def topk(scores, k, *, largest=True):
  """Each row's `k` best entries: stable sort, so ties go to the lower column index.

  Returns `(values, indices)`, each `(..., k)`.
  """
  s = _f64(scores)
  order = np.argsort(-s if largest else s, axis=-1, kind="stable")[..., :k]
  return np.take_along_axis(s, order, axis=-1), order


def pairs_above(scores, threshold, *, largest=True, upper=False):
  """Row-major `(rows, cols, values)` of entries `>= threshold` (`<=` if not `largest`);
  `upper=True` keeps only `i < j`."""
  s = _f64(scores)
  hit = s >= threshold if largest else s <= threshold
  if upper:
    hit &= np.triu(np.ones(s.shape, bool), 1)
  rows, cols = np.nonzero(hit)
  return rows, cols, s[rows, cols]


def pair_values(scores, *, within=False, diagonal=False):
  """The scores of all pairs: every entry, or for `within` the `i < j` entries (`i <= j`
  with `diagonal`)."""
  s = _f64(scores)
  if not within:
    return s.ravel()
  return s[np.triu_indices(s.shape[0], 0 if diagonal else 1)]


# --- Attention (jaxsim.attention, attention_scores, attention_weights) --------------------
# (B, T, N, H) queries, (B, S, K, H) keys/values: every key/value head is repeated over its
# group of N // K query heads. Masked logits are dropped (-inf), not set to a large negative,
# and a row with no visible key gets zero weights.


def _heads(a, n):
  """(B, S, K, H) -> (B, N, S, H), key head k serving query heads k*G .. k*G + G-1."""
  a = _f64(a)
  return np.moveaxis(np.repeat(a, n // a.shape[-2], axis=-2), -2, -3)


def attention_logits(q, k, *, kind="scaled_dot", scale=None, bias=None):
  """Unmasked `(B, N, T, S)` logits; cosine's default scale is sqrt(H)."""
  n, h = np.shape(q)[-2:]
  qh, kh = np.moveaxis(_f64(q), -2, -3), _heads(k, n)
  if kind == "dot":
    s = dot(qh, kh)
  elif kind == "scaled_dot":
    s = scaled_dot(qh, kh, scale)
  elif kind == "cosine":
    s = cosine(qh, kh) * (np.sqrt(h) if scale is None else scale)
  else:
    raise ValueError(kind)
  return s if bias is None else s + _f64(bias)


def attention_keep(shape, mask=None, is_causal=False):
  """Where a `(B, N, T, S)` logit is visible: the mask, and `j <= i` when causal."""
  keep = np.ones(shape, bool)
  if mask is not None:
    keep &= np.asarray(mask, bool)
  if is_causal:
    keep &= np.tril(np.ones(shape[-2:], bool))
  return keep


def attention_weights(q, k, *, mask=None, is_causal=False, **kwargs):
  s = attention_logits(q, k, **kwargs)
  s = np.where(attention_keep(s.shape, mask, is_causal), s, -np.inf)
  top = np.max(s, axis=-1, keepdims=True)
  e = np.exp(s - np.where(np.isfinite(top), top, 0.0))
  total = np.sum(e, axis=-1, keepdims=True)
  return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def attention(q, k, v, **kwargs):
  """`(B, T, N, Hv)` output."""
  w = attention_weights(q, k, **kwargs)
  return np.moveaxis(w @ _heads(v, np.shape(q)[-2]), -3, -2)
