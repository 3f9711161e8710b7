"""Scale-out: one SAE over a data x latent mesh of processes, with exact sharded top-k.

The ``[parallel]`` config and the latent ranges live in ``sae_engine.parallel_config`` (the run
config imports them; nothing here is imported upward). ``mesh`` starts torch.distributed under
torchrun; ``selection`` is the exact sharded top-k; ``torch_sharded``
applies the mesh to a plain ``TorchSAE`` from outside.
"""
