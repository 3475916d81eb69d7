"""Tolerances for comparing float32 results computed in a different order.

A sharded computation sums the same terms as one device, split over shards and combined
in another order. Each float32 reduction then differs by up to about n * eps * sum|terms|
(eps = 1.2e-7), which is small relative to the largest value of an array but can be
large relative to a value that is itself a near-cancellation (a gradient entry close to
0). So arrays are compared with a relative tolerance plus an absolute one scaled by the
array's own largest magnitude, never with a fixed absolute tolerance.

Adam's first update, lr * g / (|g| + eps), is not compared across shardings at all: it
amplifies a rounding difference in a near-zero gradient by up to lr / eps. The sharded
tests compare gradients, and parameters after an SGD update (linear in the gradient);
parameter *differences* before and after are not compared, since each carries up to one
float32 rounding of the parameter itself, far above the update's own error.
"""

import jax
import numpy as np

RTOL = 1e-4  # Reordered float32 sums over up to ~1e4 terms.
SCALED_ATOL = 1e-5  # Times the largest |value| of the expected array.


def assert_close(actual, expected, rtol: float = RTOL, scaled_atol: float = SCALED_ATOL,
                 what: str = ""):
  expected = np.asarray(expected, np.float64)
  atol = scaled_atol * max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol,
                             err_msg=what)


def assert_trees_close(actual, expected, rtol: float = RTOL,
                       scaled_atol: float = SCALED_ATOL):
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e)
  for (path, a), e in zip(flat_a, flat_e):
    assert_close(a, e, rtol, scaled_atol, what=jax.tree_util.keystr(path))
