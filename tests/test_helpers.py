"""The test helpers of conftest.py do what they claim."""

import jax.numpy as jnp

from conftest import tree_equal


def test_tree_equal_compares_structure_and_bits():
  x, y = jnp.zeros(2), jnp.ones(2)
  assert tree_equal({'a': x, 'b': y}, {'a': x, 'b': y})
  # As many leaves, equal values, other names: another structure.
  assert not tree_equal({'a': x, 'b': x}, {'a': x, 'c': x})
  assert not tree_equal({'a': {'b': x}}, {'a': x, 'b': x})
  assert not tree_equal({'a': x, 'b': y}, {'a': x, 'b': x})
  assert not tree_equal({'a': x}, {'a': x.astype(jnp.bfloat16)})
  assert not tree_equal({'a': x}, {'a': jnp.zeros(3)})
  assert not tree_equal({'a': x}, {'a': x, 'b': x})
