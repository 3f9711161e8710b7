"""Scale-out: one SAE over a data x latent mesh of processes, with exact sharded top-k.

``dims`` (the ``[parallel]`` config, latent ranges) imports nothing heavy; ``mesh`` starts
torch.distributed under torchrun; ``selection`` is the exact sharded top-k; ``torch_sharded``
applies the mesh to a plain ``TorchSAE`` from outside.
"""
