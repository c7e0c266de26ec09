"""Shape buckets: few distinct sizes, never fewer rows than asked, a single row unpadded."""

import numpy as np

from know2vec_jax import shapes


def test_buckets_are_few_hold_every_row_and_leave_one_row_alone():
  for cap, floor in ((2048, 1), (2048, 32), (256, 16), (8, 32)):
    sizes = {n: shapes.bucket(n, cap, floor) for n in range(1, 3 * cap)}
    assert sizes[1] == 1  # one query, the latency path: no padding
    for n, b in sizes.items():
      assert b == cap or n <= b  # a chunk of ``cap`` holds the rest
      assert b <= cap and (b == 1 or b >= min(floor, cap)) and b & (b - 1) == 0
      if 1 < n <= cap:
        assert b < 2 * max(n, floor)  # at most doubled (or the floor)
    assert len(set(sizes.values())) <= int(np.log2(cap)) + 2
  # The floor merges small batches into one size.
  assert {shapes.bucket(n, 2048, 32) for n in range(2, 33)} == {32}
  x = np.ones((3, 2), np.float32)
  padded = np.asarray(shapes.pad_rows(x, 8))
  assert padded.shape == (8, 2) and (padded[:3] == 1).all() and (padded[3:] == 0).all()
  assert shapes.pad_rows(x, 3) is x
