"""PyTorch equivalents of the zoo's architectures, with the weights of a JAX stack (baselines).

Each model becomes an ordinary ``torch.nn.Sequential`` of ``Conv2d`` / ``ReLU`` / ``Linear`` in
PyTorch's native NCHW layout, the way a per-model PyTorch zoo would be written, so the baseline is
PyTorch's eager loop at its own best layout:

- ``'SAME'`` padding becomes ``Conv2d(padding=1)`` where it is symmetric and an explicit
  ``ZeroPad2d`` (one row/column at the bottom/right) where a stride-2 layer pads unevenly.
- The first dense layer's rows are permuted from JAX's (h, w, c) flattening order to PyTorch's
  (c, h, w), so ``Flatten`` on NCHW feeds it the same numbers.

:func:`max_abs_diff` checks that the two compute the same logits; the benchmarks record it. When
JAX runs on a GPU and PyTorch has CUDA, the PyTorch baseline runs on the GPU too (:func:`device`).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
from flax import nnx

from know2vec_jax.zoo.architectures import make_model


def _t(torch, a) -> "torch.Tensor":
  return torch.from_numpy(np.array(a, np.float32, order="C"))  # a writable copy


def device(torch) -> str:
  """Where the PyTorch baseline runs: the GPU when JAX uses one and PyTorch has CUDA, else CPU."""
  import jax
  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return "cuda"
  return "cpu"


def sync(torch) -> None:
  """Waits for queued CUDA work (PyTorch, like JAX, returns before a GPU kernel finishes)."""
  if torch.cuda.is_available() and torch.cuda.is_initialized():
    torch.cuda.synchronize()


def torch_models(torch, arch: str, params, image_shape=(28, 28, 1)) -> list:
  """One eval-mode PyTorch module per model of a stack.

  Args:
    torch: the imported ``torch`` module (an optional dependency of the suite).
    arch: ``"mlp"``, ``"cnn_s"`` or ``"cnn_l"``.
    params: the stack's NNX parameter state, leading axis M.
    image_shape: (H, W, C) of the inputs.

  Returns:
    M ``torch.nn.Sequential`` modules (on :func:`device`) taking float32 NCHW images and
    returning [B, K] logits.
  """
  nn = torch.nn
  p = nnx.to_pure_dict(params)
  m, _, num_classes = np.asarray(p["head"]["kernel"]).shape
  # Strides are structure, not parameters: read them off the architecture itself.
  shape = nnx.eval_shape(lambda: make_model(arch, num_classes, image_shape=image_shape))
  strides = [conv.stride for conv in getattr(shape, "convs", [])]
  h, w, c = image_shape
  models = []
  for i in range(m):
    layers = []
    hh, ww, cc = h, w, c
    if "convs" in p:
      for j in sorted(p["convs"], key=int):
        kernel = np.asarray(p["convs"][j]["kernel"][i])  # HWIO
        k, _, cin, cout = kernel.shape
        stride = strides[int(j)]
        ho, wo = math.ceil(hh / stride), math.ceil(ww / stride)
        pad_h = max((ho - 1) * stride + k - hh, 0)
        pad_w = max((wo - 1) * stride + k - ww, 0)
        if pad_h % 2 == 0 and pad_w % 2 == 0:
          conv = nn.Conv2d(cin, cout, k, stride, padding=(pad_h // 2, pad_w // 2))
        else:
          layers.append(nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2,
                                      pad_h // 2, pad_h - pad_h // 2)))
          conv = nn.Conv2d(cin, cout, k, stride, padding=0)
        conv.weight.data = _t(torch, kernel.transpose(3, 2, 0, 1))  # OIHW
        conv.bias.data = _t(torch, p["convs"][j]["bias"][i])
        layers += [conv, nn.ReLU()]
        hh, ww, cc = ho, wo, cout
    fc = np.asarray(p["fc"]["kernel"][i])  # [(h, w, c), hidden]
    hidden = fc.shape[1]
    fc = fc.reshape(hh, ww, cc, hidden).transpose(2, 0, 1, 3).reshape(-1, hidden)
    lin = nn.Linear(fc.shape[0], hidden)
    lin.weight.data = _t(torch, fc.T)
    lin.bias.data = _t(torch, p["fc"]["bias"][i])
    head_k = np.asarray(p["head"]["kernel"][i])
    head = nn.Linear(*head_k.shape)
    head.weight.data = _t(torch, head_k.T)
    head.bias.data = _t(torch, p["head"]["bias"][i])
    layers += [nn.Flatten(), lin, nn.ReLU(), head]
    models.append(nn.Sequential(*layers).eval().to(device(torch)))
  return models


def nchw(torch, images) -> "torch.Tensor":
  """NHWC float images ([..., H, W, C]) as a contiguous NCHW float32 tensor on :func:`device`."""
  x = np.asarray(images, np.float32)
  return _t(torch, np.moveaxis(x, -1, -3)).to(device(torch))


def max_abs_diff(torch, models, images_nhwc, jax_logits) -> float:
  """Largest |PyTorch - JAX| logit over the first two models (a check the weights carried over).

  ``images_nhwc``: [B, H, W, C] shared, or [M, B, H, W, C] one batch per model.
  """
  x = np.asarray(images_nhwc)
  ref = np.asarray(jax_logits)
  worst = 0.0
  with torch.inference_mode():
    for i, model in enumerate(models[:2]):
      xi = x if x.ndim == 4 else x[i]
      out = model(nchw(torch, xi)).cpu().numpy()
      worst = max(worst, float(np.abs(out - ref[i]).max()))
  return worst


def thread_counts(torch) -> list[int]:
  """The thread counts a PyTorch baseline runs at: its default and, if that is more, one.

  One thread is tried on CPU-only machines, where a small core count shared with other work can
  make PyTorch's OpenMP pool lose more than it gains. Beside an accelerator the default alone runs
  (a CUDA baseline barely uses host threads; a CPU one gets the whole host).
  """
  import jax
  default = torch.get_num_threads()
  return [default, 1] if default > 1 and jax.default_backend() == "cpu" else [default]


@contextlib.contextmanager
def num_threads(torch, n: int):
  """Runs the block with ``torch.set_num_threads(n)``, restoring the previous count after."""
  before = torch.get_num_threads()
  torch.set_num_threads(n)
  try:
    yield
  finally:
    torch.set_num_threads(before)
