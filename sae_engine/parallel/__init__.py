"""Scale-out: one SAE over a data x latent mesh, with exact sharded top-k, applied from outside.

The ``[parallel]`` config and the latent ranges live in ``sae_engine.parallel_config`` (the run
config imports them; nothing here is imported upward); ``apply`` is all the trainer calls.
torch: ``mesh`` starts torch.distributed under torchrun, ``selection`` is the exact sharded
top-k, ``torch_sharded`` applies the mesh to a plain ``TorchSAE``, ``grad_sum`` sums gradients
over data ranks, ``checkpoint`` / ``export`` are DCP checkpoints and their one-file export.
JAX: ``jax_sharded`` is the same selection with ``shard_map``, ``jax_mesh`` lays a ``JaxSAE``
out over a ``jax.sharding.Mesh``, ``jax_checkpoint`` its orbax checkpoints. ``feed`` gives each
data rank its share of every batch.
"""
