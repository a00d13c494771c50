"""The sentence-transformers retrieval jobs, streamed: code ports by changing the import.

`semantic_search`, `paraphrase_mining` and `community_detection` take the argument
names and return the structures of `sentence_transformers.util` (plain Python lists
of dicts / lists, Python ints and floats), and accept numpy, JAX and CPU torch arrays.
The work runs on `jaxsim.topk` and `jaxsim.pairs_above`, which stream the corpus in
blocks: no `n x n` score matrix is built, whatever the chunk sizes. The chunk-size
arguments are accepted and checked for compatibility; jaxsim's own tiling bounds the
memory.

Ties: sentence-transformers takes whatever order `torch.topk` gives equal scores;
here equal scores go to the lower id.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from jax.typing import ArrayLike

from jaxsim._src import buckets, pairs, search, validation
from jaxsim._src.index import _to_host

# sentence-transformers' score functions by name, and jaxsim's metric names.
_SCORE_FUNCTIONS = {"cos_sim": "cosine", "dot_score": "dot", "cosine": "cosine", "dot": "dot"}


def _metric(score_function: Any) -> str:
  name = score_function if isinstance(score_function, str) else getattr(
      score_function, "__name__", None)
  if name not in _SCORE_FUNCTIONS:
    raise ValueError("`score_function` must be sentence_transformers.util.cos_sim or dot_score "
                     f"(or 'cosine' / 'dot'), got {score_function!r}: jaxsim streams the scores "
                     "and cannot call an arbitrary function on the full matrix.")
  return _SCORE_FUNCTIONS[name]


def _matrix(value: Any, name: str):
  value = _to_host(value, name)
  if value.ndim == 1:  # sentence-transformers accepts one embedding as a 1-D tensor
    value = value[None, :]
  validation.check_rank(value, name, min_rank=2, max_rank=2)
  return value


def _check_chunks(**sizes: int) -> None:
  for name, size in sizes.items():
    validation.check_positive_int(size, name)


def semantic_search(query_embeddings: ArrayLike, corpus_embeddings: ArrayLike,
                    query_chunk_size: int = 100, corpus_chunk_size: int = 500000,
                    top_k: int = 10, score_function: Callable | str = "cosine"
                    ) -> list[list[dict[str, int | float]]]:
  r"""The `top_k` corpus entries for every query, as `sentence_transformers.util.semantic_search`.

  .. math:: \mathrm{result}_i = \operatorname{arg\,top}_{k}\, \{ s(q_i, c_j) \}

  Args:
    query_embeddings: `(q, d)` (or `(d,)`) queries.
    corpus_embeddings: `(n, d)` corpus.
    query_chunk_size, corpus_chunk_size: accepted for compatibility (positive ints);
      the search streams in jaxsim's own blocks.
    top_k: results per query; clamped to `n`, as sentence-transformers does.
    score_function: `cos_sim` (default) or `dot_score` from sentence-transformers, or
      `"cosine"` / `"dot"`.

  Returns:
    One list per query of `{"corpus_id": int, "score": float}` dicts, best first,
    equal scores by lower `corpus_id`.

  Raises:
    ValueError: for mismatched feature dims, a non-positive `top_k` or chunk size, or
      an unsupported `score_function`.

  Examples:
    >>> import numpy as np, jaxsim
    >>> corpus = np.array([[1., 0.], [0., 1.], [1., 1.]], np.float32)
    >>> jaxsim.semantic_search(np.array([[1., 0.2]], np.float32), corpus, top_k=2)[0][0]
    {'corpus_id': 0, 'score': 0.980580...}
  """
  metric = _metric(score_function)
  _check_chunks(query_chunk_size=query_chunk_size, corpus_chunk_size=corpus_chunk_size)
  top_k = validation.check_positive_int(top_k, "top_k")
  queries = _matrix(query_embeddings, "query_embeddings")
  corpus = _matrix(corpus_embeddings, "corpus_embeddings")
  n = corpus.shape[0]
  if n == 0 or queries.shape[0] == 0:
    validation.matrices(queries, corpus, x_name="query_embeddings", y_name="corpus_embeddings")
    return [[] for _ in range(queries.shape[0])]
  scores, ids = search.topk(queries, corpus, min(top_k, n), metric=metric)
  scores, ids = np.asarray(scores, np.float64).tolist(), np.asarray(ids).tolist()
  return [[{"corpus_id": j, "score": s} for j, s in zip(row_ids, row, strict=True)]
          for row_ids, row in zip(ids, scores, strict=True)]


def paraphrase_mining(embeddings: ArrayLike, query_chunk_size: int = 5000,
                      corpus_chunk_size: int = 100000, max_pairs: int = 500000,
                      top_k: int = 100, score_function: Callable | str = "cosine"
                      ) -> list[list[float | int]]:
  """The most similar pairs among `embeddings`, as sentence-transformers'
  `paraphrase_mining_embeddings` (what `paraphrase_mining` runs after encoding).

  Each row's `top_k` best other rows are candidates (`jaxsim.topk` with `top_k + 1`,
  the row itself dropped); each unordered pair is kept once, with the score from the
  lower row's list, and the best `max_pairs` pairs are returned, best first.

  Args:
    embeddings: `(n, d)` rows.
    query_chunk_size, corpus_chunk_size: accepted for compatibility (positive ints).
    max_pairs: most pairs returned.
    top_k: candidates per row; clamped to `n - 1`.
    score_function: `cos_sim` (default) or `dot_score`, or `"cosine"` / `"dot"`.

  Returns:
    A list of `[score, i, j]` with `i < j`, by decreasing score (ties: lower `i`, then
    lower `j`).

  Examples:
    >>> import numpy as np, jaxsim
    >>> x = np.array([[1., 0.], [0., 1.], [1., 0.1]], np.float32)
    >>> [p[1:] for p in jaxsim.paraphrase_mining(x, top_k=1)]
    [[0, 2], [1, 2]]
  """
  metric = _metric(score_function)
  _check_chunks(query_chunk_size=query_chunk_size, corpus_chunk_size=corpus_chunk_size)
  max_pairs = validation.check_positive_int(max_pairs, "max_pairs")
  top_k = validation.check_positive_int(top_k, "top_k")
  x = _matrix(embeddings, "embeddings")
  n = x.shape[0]
  if n < 2:
    return []
  k = min(top_k + 1, n)
  scores, ids = search.topk(x, x, k, metric=metric)
  scores, ids = np.asarray(scores, np.float64), np.asarray(ids, np.int64)
  rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)
  # Drop each row's own match, then keep its first top_k others (a row may miss
  # itself when exact duplicates outrank it).
  other = ids != rows
  rank = np.cumsum(other, axis=1)
  keep = other & (rank <= top_k)
  i, j, s = rows[keep], ids[keep], scores[keep]
  lo, hi = np.minimum(i, j), np.maximum(i, j)
  # First occurrence of each unordered pair in row order: the lower row's score.
  key = lo * n + hi
  _, first = np.unique(key, return_index=True)
  first.sort()
  lo, hi, s = lo[first], hi[first], s[first]
  order = np.lexsort((hi, lo, -s))[:max_pairs]
  return [[float(s[t]), int(lo[t]), int(hi[t])] for t in order]


def community_detection(embeddings: ArrayLike, threshold: float = 0.75,
                        min_community_size: int = 10, batch_size: int = 1024,
                        show_progress_bar: bool = False) -> list[list[int]]:
  r"""Greedy threshold communities, as `sentence_transformers.util.community_detection`.

  Every row with at least `min_community_size` rows (itself included) at cosine
  similarity `>= threshold` is a candidate centre; its community is those rows, best
  first. Candidates are taken largest first (ties: lower centre); a candidate whose
  centre is already taken is skipped, the others lose the rows already taken and are
  kept if at least `min_community_size` rows remain, with the centre first.

  The neighbour lists come from `jaxsim.pairs_above` (all pairs over the threshold,
  streamed; rerun once with a larger capacity if the first guess overflows), so no
  `n x n` matrix is built.

  Args:
    embeddings: `(n, d)` rows.
    threshold: the cosine similarity floor.
    min_community_size: smallest community returned; clamped as sentence-transformers
      does (no communities when `n < min_community_size`).
    batch_size: accepted for compatibility (a positive int).
    show_progress_bar: accepted for compatibility.

  Returns:
    Communities as lists of row ids, largest first, no row in two.

  Examples:
    >>> import numpy as np, jaxsim
    >>> x = np.array([[1., 0.], [1., 0.05], [0., 1.], [0.02, 1.], [0.01, 1.]], np.float32)
    >>> jaxsim.community_detection(x, threshold=0.9, min_community_size=2)
    [[2, 4, 3], [0, 1]]
  """
  _check_chunks(batch_size=batch_size)
  validation.check_bool(show_progress_bar, "show_progress_bar")
  threshold = float(validation.check_scalar(threshold, "threshold"))
  min_community_size = validation.check_positive_int(min_community_size, "min_community_size")
  x = _matrix(embeddings, "embeddings")
  n = x.shape[0]
  if n == 0 or n < min_community_size:
    return []
  rows, cols, scores = _pairs(x, threshold)
  # Each row's neighbours: both directions of every pair, plus itself (score 1 for a
  # nonzero row, the pairwise diagonal).
  norms = np.linalg.norm(np.asarray(x, np.float64), axis=1)
  self_score = np.where(norms > 0, 1.0, 0.0)
  selves = np.flatnonzero(self_score >= threshold)
  centre = np.concatenate([rows, cols, selves])
  member = np.concatenate([cols, rows, selves])
  score = np.concatenate([scores, scores, self_score[selves]])
  # Group by centre; within a centre best first, equal scores by lower id.
  order = np.lexsort((member, -score, centre))
  centre, member = centre[order], member[order]
  size = np.bincount(centre, minlength=n)
  starts = np.concatenate([[0], np.cumsum(size)])
  candidates = np.flatnonzero(size >= min_community_size)
  # Largest first, ties by lower centre (a stable sort of the centres in order).
  candidates = candidates[np.argsort(-size[candidates], kind="stable")]
  used = np.zeros(n, bool)
  out = []
  for c in candidates:
    if used[c]:
      continue
    community = member[starts[c]:starts[c + 1]]
    free = community[~used[community]]
    if len(free) >= min_community_size:
      chosen = [int(c)] + free[free != c].tolist()
      out.append(chosen)
      used[chosen] = True
  return sorted(out, key=len, reverse=True)


def _pairs(x, threshold: float):
  """All pairs `i < j` with cosine `>= threshold`, as numpy (rows, cols, scores)."""
  capacity = buckets.size_bucket(4 * x.shape[0])
  while True:
    found = _quiet_pairs(x, threshold, capacity)
    count = int(found.count)
    if count <= capacity:
      break
    capacity = buckets.size_bucket(count)
  held = slice(0, count)
  return (np.asarray(found.rows)[held].astype(np.int64), np.asarray(found.cols)[held].astype(
      np.int64), np.asarray(found.scores, np.float64)[held])


def _quiet_pairs(x, threshold, capacity):
  with warnings.catch_warnings():
    # An overflow is expected on the first guess and handled by the caller.
    warnings.simplefilter("ignore", RuntimeWarning)
    return pairs.pairs_above(x, threshold=threshold, max_pairs=capacity, metric="cosine")
