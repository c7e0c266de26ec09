"""The machine's own peaks, measured in the same run as everything else.

- **matmul**: one large float32 matmul (FLOP/s), the reference for dense work (aligner, zoo
  training, batched retrieval).
- **convolution**: one large convolution of the kind the zoo's CNNs run: the heaviest ``cnn_l``
  layer (3x3, 64 -> 64 channels, stride 1, 7x7 maps) through the zoo's own :class:`Conv` module,
  both lowerings (``im2col`` matmuls, as the zoo uses, and ``lax.conv``). The batch is swept, and
  the largest batch is run once more in chunks of the best batch (an im2col convolution's patches
  fall out of cache at large batches, so a large one runs best in cache-sized pieces); the best
  rate is the peak. Probing is reported as a fraction of the im2col peak (and of the lax.conv one
  in the probe rows).
- **memory scan**: the sum of a large float32 array (bytes/s), the bound for a brute-force index
  scan. The faster of JAX and numpy is the peak.

A peak is what the machine *reaches*, so each one is computed from the fastest of its timed calls
(``gflops_per_s`` / ``gbytes_per_s``; the median-based rate is beside it). Figures compared with a
peak use their median, so the fractions elsewhere in the suite lean low, never high.

**The bounds.** ``f32_gflops_per_s`` is the best float32 multiply-add rate of the three (matmul and
both convolution lowerings): every FLOP figure of the suite is float32 multiply-adds, and a
fraction of it is a fraction of the fastest such arithmetic this machine was seen to do.
Benchmarks report fractions through :func:`benchmarks.common.fraction`, whose reference is this
peak or any faster best call of their own run, so no fraction exceeds 1 (a small
working set that fits in cache can beat a peak measured on a large one: then the fraction is of
that best call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import accelerator, compare, time_call
from know2vec_jax.zoo.architectures import Conv

NAME = "peak"


def matmul_size(quick: bool) -> int:
  """n of the peak's n x n matmul (large enough to reach the machine's dense rate)."""
  return 8192 if accelerator() else (2048 if quick else 4096)


def matmul_call(n: int):
  """(a zero-argument jitted n x n float32 matmul, its FLOPs); the probe benchmark times it
  interleaved with probing."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  return (lambda: f(a, b)), 2 * n ** 3


def _matmul(n: int) -> dict:
  fn, _ = matmul_call(n)
  t = time_call(fn, repeats=5, warmup=2)
  return dict(what="matmul f32", shape=f"{n}x{n} @ {n}x{n}",
              gflops_per_s=2 * n ** 3 / t["min_s"] / 1e9,
              median_gflops_per_s=2 * n ** 3 / t["median_s"] / 1e9, **t)


def conv_call(batch: int, impl: str, chunk: int | None = None):
  """(a zero-argument jitted call of the reference convolution on ``batch`` images, its FLOPs).

  With ``chunk``, the batch runs as a ``lax.map`` over chunks of that many images: one large
  convolution computed in cache-sized pieces. The probe benchmark times this call interleaved
  with probing (see ``benchmarks/probe.py``).
  """
  conv = Conv(64, 64, 3, 1, impl=impl, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(conv)
  x = jax.random.uniform(jax.random.key(0), (batch, 7, 7, 64), jnp.float32)
  if chunk is None or chunk >= batch:
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  else:
    f = jax.jit(lambda s, x: jax.lax.map(nnx.merge(graphdef, s),
                                         x.reshape((-1, chunk) + x.shape[1:])))
  return (lambda: f(state, x)), 2 * batch * 7 * 7 * 9 * 64 * 64


def _conv(batch: int, impl: str, chunk: int | None = None) -> dict:
  fn, flops = conv_call(batch, impl, chunk)
  t = time_call(fn, repeats=5, warmup=2)
  shape = f"[{batch},7,7,64] 3x3 -> 64" + (f", chunks of {chunk}" if chunk else "")
  return dict(what=f"conv {impl}", shape=shape, batch=batch, chunk=chunk,
              gflops_per_s=flops / t["min_s"] / 1e9,
              median_gflops_per_s=flops / t["median_s"] / 1e9, **t)


def _scan(nbytes: int) -> list[dict]:
  n = nbytes // 4
  x = jax.random.uniform(jax.random.key(0), (n,), jnp.float32)
  xh = np.asarray(x)
  f = jax.jit(jnp.sum)
  t = compare({"jax": lambda: f(x), "numpy": lambda: xh.sum()}, repeats=5, warmup=2)
  return [dict(what=f"memory scan ({name} sum)", shape=f"{nbytes / 2**20:.0f} MiB f32",
               gbytes_per_s=nbytes / s["min_s"] / 1e9,
               median_gbytes_per_s=nbytes / s["median_s"] / 1e9, **s) for name, s in t.items()]


def run(quick: bool = False, ctx: dict | None = None) -> dict:
  accel = accelerator()
  n = matmul_size(quick)
  batches = (4096, 16384, 65536) if accel else ((64, 256) if quick else (64, 256, 1024))
  nbytes = (256 if quick else 1024) * 2**20
  rows = [_matmul(n)]
  for impl in ("im2col", "xla"):
    rows += [_conv(b, impl) for b in batches]
  # The largest batch again, in chunks of the best batch so far: the im2col convolution at its
  # best on a large batch (the probe's own CPU formulation; see know2vec_jax/probe.py).
  best_small = max((r for r in rows if r["what"] == "conv im2col"),
                   key=lambda r: r["gflops_per_s"])["batch"]
  if best_small < batches[-1]:
    rows.append(_conv(batches[-1], "im2col", best_small))
  rows += _scan(nbytes)
  for r in rows:
    rate = (f"{r['gflops_per_s']:8.1f} GFLOP/s" if "gflops_per_s" in r
            else f"{r['gbytes_per_s']:8.1f} GB/s")
    print(f"  {r['what']:24s} {r['shape']:26s} {rate}", flush=True)

  def best(what, key):
    return max(r[key] for r in rows if r["what"].startswith(what))
  peaks = {"matmul_gflops_per_s": best("matmul", "gflops_per_s"),
           "conv_im2col_best_chunk": best_small,
           "conv_im2col_gflops_per_s": best("conv im2col", "gflops_per_s"),
           "conv_xla_gflops_per_s": best("conv xla", "gflops_per_s"),
           "memory_gbytes_per_s": best("memory scan", "gbytes_per_s")}
  # The bound of every FLOP fraction in the suite: the fastest float32 multiply-adds measured.
  peaks["f32_gflops_per_s"] = max(peaks["matmul_gflops_per_s"], peaks["conv_im2col_gflops_per_s"],
                                  peaks["conv_xla_gflops_per_s"])
  if ctx is not None:
    ctx["peak"] = peaks
  return {"rows": rows, "peaks": peaks,
          "note": "peaks from the fastest timed call; conv peaks: the best over the batch sweep; "
                  "memory: the faster of JAX and numpy summing one large float32 array; "
                  "f32_gflops_per_s: the best of matmul and both convolutions, the bound of "
                  "every FLOP fraction in the suite"}
