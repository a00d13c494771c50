"""jaxsim: pairwise similarity, blocked search and attention in JAX."""

from jaxsim._src.kernels import cosine as cosine
from jaxsim._src.kernels import dot as dot
from jaxsim._src.kernels import euclidean as euclidean
from jaxsim._src.kernels import pairwise as pairwise
from jaxsim._src.kernels import scaled_dot as scaled_dot
from jaxsim._src.kernels import sq_euclidean as sq_euclidean

__version__ = "0.1.0"

__all__ = (
    "cosine",
    "dot",
    "euclidean",
    "pairwise",
    "scaled_dot",
    "sq_euclidean",
)
