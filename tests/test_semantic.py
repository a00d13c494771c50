"""The sentence-transformers jobs against sentence_transformers.util on the real MiniLM table.

Scores are float32 in both libraries but come from differently shaped matmuls, so two
candidates whose scores agree to about 1e-7 may come out in either order; the checks
below demand equal ids and lists except for such near-ties, and say where they allow
them.
"""

import doctest

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsim
from jaxsim._src import semantic

st_util = pytest.importorskip("sentence_transformers.util")
torch = pytest.importorskip("torch")
data = pytest.importorskip("experiments.data")

NEAR = 1e-6  # scores closer than this may order either way


@pytest.fixture(scope="module")
def table():
  try:
    return data.minilm_token_table()
  except ImportError as err:
    pytest.skip(str(err))


def _same_ranking(ours, theirs):
  """Equal (score, id) rankings up to the order of near-equal scores.

  `ours`/`theirs`: lists of (score, key). Scores must agree position by position
  within NEAR, and each key must sit where the other list holds a near-equal score.
  """
  assert len(ours) == len(theirs)
  s_ours = np.array([s for s, _ in ours])
  s_theirs = np.array([s for s, _ in theirs])
  np.testing.assert_allclose(s_ours, s_theirs, atol=NEAR)
  assert np.all(np.diff(s_ours) <= 0)
  where = {key: s for s, key in theirs}
  for s, key in ours:
    if key in where:
      assert abs(where[key] - s) <= NEAR
    else:  # only allowed at the cut-off, among scores tied with the last one
      assert abs(s - s_theirs[-1]) <= NEAR, (s, key)


@pytest.mark.parametrize("kind", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("top_k", [1, 10, 100])
def test_semantic_search_matches_sentence_transformers(table, kind, top_k):
  corpus, queries = table[:6000], table[20000:20040]
  convert = {"numpy": np.asarray, "jax": jnp.asarray, "torch": torch.from_numpy}[kind]
  ours = jaxsim.semantic_search(convert(queries), convert(corpus), top_k=top_k)
  theirs = st_util.semantic_search(torch.from_numpy(queries), torch.from_numpy(corpus),
                                   top_k=top_k)
  assert len(ours) == len(theirs) == 40
  for o, t in zip(ours, theirs, strict=True):
    assert all(set(hit) == {"corpus_id", "score"} for hit in o)
    assert all(type(h["corpus_id"]) is int and type(h["score"]) is float for h in o)
    _same_ranking([(h["score"], h["corpus_id"]) for h in o],
                  [(h["score"], h["corpus_id"]) for h in t])


def test_semantic_search_dot_score_and_clamp(table):
  corpus, queries = table[:300], table[500:505]
  ours = jaxsim.semantic_search(queries, corpus, top_k=1000, score_function=st_util.dot_score)
  theirs = st_util.semantic_search(torch.from_numpy(queries), torch.from_numpy(corpus),
                                   top_k=1000, score_function=st_util.dot_score)
  assert [len(r) for r in ours] == [300] * 5  # top_k clamped to the corpus, as theirs
  for o, t in zip(ours, theirs, strict=True):
    assert [h["corpus_id"] for h in o] == [h["corpus_id"] for h in t]
    np.testing.assert_allclose([h["score"] for h in o], [h["score"] for h in t], rtol=1e-5)


@pytest.mark.parametrize("top_k,max_pairs", [(5, 2000), (3, 500000), (50, 100)])
def test_paraphrase_mining_matches_sentence_transformers(table, top_k, max_pairs):
  x = table[:3000]
  ours = jaxsim.paraphrase_mining(torch.from_numpy(x), top_k=top_k, max_pairs=max_pairs)
  theirs = st_util.paraphrase_mining_embeddings(torch.from_numpy(x), top_k=top_k,
                                                max_pairs=max_pairs)
  assert all(i < j and type(s) is float for s, i, j in ours)
  _same_ranking([(s, (i, j)) for s, i, j in ours], [(s, (i, j)) for s, i, j in theirs])
  if max_pairs >= len(theirs) + 1:
    assert {(i, j) for _, i, j in ours} == {(i, j) for _, i, j in theirs}


@pytest.mark.parametrize("threshold,min_size", [(0.5, 5), (0.4, 10), (0.6, 2)])
def test_community_detection_matches_sentence_transformers(table, threshold, min_size):
  x = table[:6000]
  ours = jaxsim.community_detection(jnp.asarray(x), threshold=threshold,
                                    min_community_size=min_size)
  theirs = st_util.community_detection(torch.from_numpy(x), threshold=threshold,
                                       min_community_size=min_size)
  assert len(ours) == len(theirs) > 3
  assert [len(c) for c in ours] == [len(c) for c in theirs]
  # Equal communities with the same centre first; members after the centre are
  # ranked by score, where near-ties may swap.
  assert [c[0] for c in ours] == [c[0] for c in theirs]
  assert [set(c) for c in ours] == [set(c) for c in theirs]
  used = [i for c in ours for i in c]
  assert len(used) == len(set(used))  # no row in two communities
  assert all(len(c) >= min_size for c in ours)


def test_community_detection_small_and_empty():
  x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
  assert jaxsim.community_detection(x, min_community_size=10) == []
  assert jaxsim.community_detection(np.zeros((0, 8), np.float32)) == []
  # All rows equal: one community of everything, the first row its centre.
  same = np.ones((700, 8), np.float32)
  assert jaxsim.community_detection(same, min_community_size=3) == [list(range(700))]
  theirs = st_util.community_detection(torch.from_numpy(same), min_community_size=3)
  assert len(theirs) == 1 and sorted(theirs[0]) == list(range(700))  # theirs: torch tie order


def test_bad_input():
  x = np.ones((4, 3), np.float32)
  with pytest.raises(ValueError, match="`score_function`"):
    jaxsim.semantic_search(x, x, score_function=lambda a, b: a @ b.T)
  with pytest.raises(ValueError, match="`top_k` must be a positive int"):
    jaxsim.semantic_search(x, x, top_k=0)
  with pytest.raises(ValueError, match="same feature dim"):
    jaxsim.semantic_search(x, np.ones((4, 2), np.float32))
  with pytest.raises(ValueError, match="`max_pairs`"):
    jaxsim.paraphrase_mining(x, max_pairs=0)
  with pytest.raises(ValueError, match="`query_chunk_size`"):
    jaxsim.paraphrase_mining(x, query_chunk_size=-1)
  with pytest.raises(ValueError, match="`min_community_size`"):
    jaxsim.community_detection(x, min_community_size=0)
  with pytest.raises(ValueError, match="`embeddings` must have rank"):
    jaxsim.community_detection(np.ones((2, 2, 2), np.float32))


def test_docstring_examples():
  result = doctest.testmod(semantic, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
