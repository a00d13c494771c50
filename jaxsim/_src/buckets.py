"""The ladder of shape buckets: pad sizes that vary from call to call so XLA compiles once.

XLA compiles one program per input shape, and on a CPU a search program takes 0.5 to
2.5 s to compile. A server that sees every batch size from 1 to 2048 would compile
thousands of programs; padding each size up to the next step of a short ladder, and
masking the padding, compiles at most one program per step.

The ladders:

- **Query counts** (`size_bucket`): the powers of two, 1, 2, 4, ..., so any count in
  1..2048 lands on one of 12 steps.
- **`k`** (`k_bucket`): 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (the powers of two and 1.5
  times the powers of two): the per-block selection grows with `k`, so `k = 10` runs
  as 12, not 16.
- **Index capacity** (`capacity_bucket`), in pages of `page` rows: 1, 2, 4, 8, 16,
  32, then 48, 64, 96, 128, 192, ... pages (powers of two, and above 32 pages also
  1.5 times the powers of two). A small index that grows crosses few steps (few
  compiles); a large one uses at most about a third more memory than its rows need.
  Search time does not grow with the padding: pages past the last row are skipped.

Examples:
  >>> from jaxsim._src import buckets
  >>> [buckets.size_bucket(n) for n in (1, 3, 16, 17, 2048)]
  [1, 4, 16, 32, 2048]
  >>> [buckets.k_bucket(k) for k in (1, 3, 5, 10, 100)]
  [1, 3, 6, 12, 128]
  >>> [buckets.capacity_bucket(n, page=1024) for n in (1, 1025, 2049, 40_000, 50_000)]
  [1024, 2048, 4096, 49152, 65536]
"""

from __future__ import annotations

# Page counts above which the capacity ladder takes 1.5x steps too.
FINE_FROM = 32


def size_bucket(n: int) -> int:
  """The smallest power of two `>= n` (and `>= 1`): the step for query counts and `k`."""
  n = max(int(n), 1)
  return 1 << (n - 1).bit_length()


def k_bucket(k: int) -> int:
  """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... that is `>= k` (and `>= 1`)."""
  k = max(int(k), 1)
  power = size_bucket(k)
  three_halves = 3 * power // 4
  return three_halves if power >= 4 and three_halves >= k else power


def page_bucket(pages: int) -> int:
  """The smallest step of the page ladder that is `>= pages` (and `>= 1`).

  Powers of two up to `FINE_FROM` pages (a growing index crosses few steps, so it
  compiles few programs); above, 1.5 times the powers of two as well (48, 64, 96,
  ...), so a large index wastes at most about a third of its memory.
  """
  pages = max(int(pages), 1)
  power = size_bucket(pages)
  three_halves = 3 * power // 4  # 1.5 x the power of two below `power`
  return three_halves if power > FINE_FROM and three_halves >= pages else power


def capacity_bucket(rows: int, *, page: int) -> int:
  """Rows of storage for `rows` rows: a page count on the ladder, times `page`."""
  return page * page_bucket(-(-max(int(rows), 1) // page))


def ladder(limit: int) -> list[int]:
  """The query-count steps up to `size_bucket(limit)`, for documentation and tests."""
  out, step = [], 1
  while step < size_bucket(limit) * 2:
    out.append(step)
    step *= 2
  return out
