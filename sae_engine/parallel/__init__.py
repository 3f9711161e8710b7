"""Scale-out: one SAE over a data x latent mesh, with exact sharded top-k, applied from outside.

``placements`` holds the two placements the trainer is handed (``training.placement``) and
nothing else here is called by training. torch: ``mesh`` starts torch.distributed under
torchrun, ``selection`` is the exact sharded top-k, ``torch_sharded`` applies the mesh to a
plain ``TorchSAE``, ``grad_sum`` sums gradients over data ranks, ``feed`` gives each data rank
its share of every batch. JAX: ``jax_sharded`` is the same selection with ``shard_map``,
``jax_mesh`` lays a ``JaxSAE`` out over a ``jax.sharding.Mesh``. Their checkpoints (DCP,
orbax) live in ``sae_engine.checkpoints``; the ``[parallel]`` config in
``sae_engine.parallel_config``.
"""
