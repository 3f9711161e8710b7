"""The sharded path on one CUDA GPU: nccl, a DeviceMesh on CUDA, the compiled Triton kernels in
the sharded step, and a DCP checkpoint of CUDA tensors (a machine with one GPU runs a world of
one rank; the multi-rank logic is tested on gloo)."""
from __future__ import annotations

import pytest
import torch

from sae_engine.config import RunConfig
from sae_engine.parallel.launch import run_local

STEPS, BATCH = 10, 256


def _one_gpu_rank(out_dir: str) -> dict[str, float]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sae_engine.checkpoints.dcp import load_rows, save_sharded
    from sae_engine.parallel.comm import Comm
    from sae_engine.parallel.mesh import ParallelMesh
    from sae_engine.parallel.torch_sharded import sharded_torch_backend
    from sae_engine.training.torch_backend import TorchSAE

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    device_mesh = init_device_mesh("cuda", (1, 1), mesh_dim_names=("data", "latent"))
    mesh = ParallelMesh(1, 1, 0, 0, Comm(device_mesh.get_group("data")), Comm(device_mesh.get_group("latent")),
                        device, device_mesh)
    config = RunConfig.from_dict({"model": {"d_in": 256, "n_latents": 8192, "k": 16},
                                  "train": {"batch_size": BATCH, "precision": "fp32", "device": "cuda",
                                            "warmup_steps": 0}})
    sharded, plain = sharded_torch_backend(config, mesh, "fp32"), TorchSAE(config, device)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = torch.randn(STEPS, BATCH, 256, device=device, generator=g)
    for sae in (sharded, plain):
        sae.initialize(batches[0], batches[0])
        for batch in batches:
            sae.train_step(batch, batch, 1e-3)
    worst = {key: (value - plain.state_tensors()[key]).abs().max().item()
             for key, value in sharded.state_tensors().items() if value.is_floating_point()}
    total = torch.ones(1, device=device)
    dist.all_reduce(total)  # one nccl collective, issued for real
    meta = {"config": config.to_dict(), "step": STEPS}
    path = save_sharded(out_dir, STEPS, sharded.state_tensors(), meta, mesh, config.model.n_latents)
    back = load_rows(path, sharded.state_tensors(), config.model.n_latents, mesh)
    same = all(torch.equal(back[key].cuda(), value) for key, value in sharded.state_tensors().items())
    dist.destroy_process_group()
    return {"worst": max(worst.values()), "all_reduce": total.item(), "checkpoint_equal": float(same)}


@pytest.mark.gpu
def test_one_gpu_sharded_step_nccl_and_checkpoint(tmp_path):
    result = run_local(_one_gpu_rank, 1, str(tmp_path), timeout=300)[0]
    assert result["all_reduce"] == 1.0
    assert result["checkpoint_equal"] == 1.0
    assert result["worst"] < 1e-4, result  # fp32, the same selection: rounding only
