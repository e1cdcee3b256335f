"""Small models of the kinds users bring, each trained with ``olr.galore``.

* :mod:`examples.models.linen_scan`: a linen transformer whose blocks run under
  ``nn.scan``, trained with ``flax.training.train_state.TrainState``; kernels
  carry logical axis names (``nn.with_logical_partitioning``), so the layer
  axis is found with no argument at all;
* :mod:`examples.models.nnx_scan`: the same in Flax NNX (``nnx.vmap`` to make
  the stack, ``nnx.scan`` to run it, ``nnx.Optimizer``);
* :mod:`examples.models.equinox_vmap`: an Equinox model whose blocks are made
  by ``eqx.filter_vmap`` and run with ``jax.lax.scan``;
* :mod:`examples.models.maxtext_layout`: a plain tree in MaxText's scanned
  layout (``param_scan_axis=1``: kernels ``(embed, layers, mlp)``).

``docs/how-to/your-model.md`` walks through them; ``tests/test_model_kinds.py``
checks that every stacked kernel is projected per layer and no ``(layers, d)``
leaf is projected.
"""
