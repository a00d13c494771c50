"""jaxsim: pairwise similarity, blocked search and attention in JAX."""

from jaxsim._src.attention import attention as attention
from jaxsim._src.attention import attention_scores as attention_scores
from jaxsim._src.attention import attention_weights as attention_weights
from jaxsim._src.distributed import ShardedRows as ShardedRows
from jaxsim._src.distributed import shard_rows as shard_rows
from jaxsim._src.graph import knn_graph as knn_graph
from jaxsim._src.index import Index as Index
from jaxsim._src.kernels import cosine as cosine
from jaxsim._src.kernels import dot as dot
from jaxsim._src.kernels import euclidean as euclidean
from jaxsim._src.kernels import pairwise as pairwise
from jaxsim._src.kernels import scaled_dot as scaled_dot
from jaxsim._src.kernels import sq_euclidean as sq_euclidean
from jaxsim._src.pairs import Pairs as Pairs
from jaxsim._src.pairs import pairs_above as pairs_above
from jaxsim._src.search import topk as topk
from jaxsim._src.semantic import community_detection as community_detection
from jaxsim._src.semantic import paraphrase_mining as paraphrase_mining
from jaxsim._src.semantic import semantic_search as semantic_search
from jaxsim._src.stats import SimilarityStats as SimilarityStats
from jaxsim._src.stats import similarity_stats as similarity_stats

__version__ = "0.1.0"

__all__ = (
    "attention",
    "attention_scores",
    "attention_weights",
    "community_detection",
    "cosine",
    "dot",
    "euclidean",
    "Index",
    "knn_graph",
    "Pairs",
    "pairs_above",
    "pairwise",
    "paraphrase_mining",
    "scaled_dot",
    "semantic_search",
    "shard_rows",
    "ShardedRows",
    "similarity_stats",
    "SimilarityStats",
    "sq_euclidean",
    "topk",
)
