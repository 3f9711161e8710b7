"""Scale-out on gloo: collectives issued and bytes sent per step (counted from the collectives
issued), per-rank state memory and peak RSS, and step time, for latent sharding against data
parallel at one shape.

    sae-engine bench parallel [--steps 5] [--meshes 2x1,2x2]

On a CPU these numbers check the logic (bytes, memory), not speed. ``estimate`` turns the
per-step byte formulas, checked here against the counted bytes, into the on-paper numbers for
a large run.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.distributed as dist

from sae_engine.benchmarks.harness import machine_info, machine_line
from sae_engine.config import RunConfig
from sae_engine.parallel_config import ParallelConfig
from sae_engine.parallel.launch import run_local
from sae_engine.parallel.mesh import build_mesh
from sae_engine.parallel.torch_sharded import sharded_torch_backend
from sae_engine.training.torch_backend import TorchSAE

SHAPE = {"d_in": 64, "n_latents": 16384, "k": 16}
BATCH = 512
MESHES = [(1, 1), (1, 2), (2, 1), (1, 4), (4, 1), (2, 2)]


def _config() -> RunConfig:
    return RunConfig.from_dict({"model": SHAPE, "train": {"batch_size": BATCH, "precision": "fp32", "device": "cpu",
                                                          "warmup_steps": 0}, "data": {"buffer_size": 2 * BATCH}})


def _measure(data: int, latent: int, steps: int) -> dict:
    config = _config()
    torch.set_num_threads(max(1, 2 // (data * latent)))
    batch = torch.randn(BATCH, SHAPE["d_in"], generator=torch.Generator().manual_seed(0))
    mesh = build_mesh(ParallelConfig(data, latent), SHAPE["n_latents"], "cpu", timeout_s=300) if data * latent > 1 else None
    sae = TorchSAE(config, torch.device("cpu")) if mesh is None else sharded_torch_backend(config, mesh, "fp32")
    rows = batch if mesh is None else batch.chunk(data)[mesh.data_rank]
    sae.initialize(batch, batch)
    for _ in range(2):
        sae.train_step(rows, rows, 1e-4)
    before = _comm_counts(mesh)
    start = time.perf_counter()
    for _ in range(steps):
        sae.train_step(rows, rows, 1e-4)
    elapsed = (time.perf_counter() - start) / steps
    per_step = {key: (value - before[key]) / steps for key, value in _comm_counts(mesh).items()}
    if mesh is not None:
        dist.destroy_process_group()
    state = sum(t.numel() * t.element_size() for t in sae.state_tensors().values())
    return {"step_s": elapsed, **per_step, "state_bytes": state,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _comm_counts(mesh) -> dict[str, int]:
    """Bytes sent and collectives issued so far over each mesh dimension (zeros for one process)."""
    if mesh is None:
        return {"data_bytes": 0, "latent_bytes": 0, "data_calls": 0, "latent_calls": 0}
    return {"data_bytes": mesh.data_comm.bytes_sent, "latent_bytes": mesh.latent_comm.bytes_sent,
            "data_calls": mesh.data_comm.collectives, "latent_calls": mesh.latent_comm.collectives}


def latent_bytes_per_step(batch: int, d: int, k: int, latent: int) -> float:
    """Bytes one latent rank sends per TopK step (no AuxK): the candidates' all-gather (fp32 key +
    int64 index) and the all-reduce of the partial reconstructions; the [d] and scalar sums aside."""
    return (latent - 1) * batch * k * 12 + 2 * (latent - 1) / latent * batch * d * 4


def data_parallel_bytes_per_step(n: int, d: int, data: int) -> float:
    """Bytes one data rank sends per step all-reducing dense W_enc, b_enc and W_dec gradients."""
    return 2 * (data - 1) / data * (2 * n * d + n) * 4


def estimate(d: int = 5120, n: int = 2**24, k: int = 64, batch: int = 8192, ranks: int = 32,
             link_gb_s: float = 50.0) -> dict:
    """On paper: one step of an SAE of n latents over ``ranks`` GPUs, latent-sharded or data parallel.

    link_gb_s: bytes per second each GPU sends on the slowest link of the ring (50 GB/s: one
    400 Gb/s InfiniBand NIC per GPU, as across the nodes of 4 x 8 H100s).
    """
    latent = latent_bytes_per_step(batch, d, k, ranks)
    dense = data_parallel_bytes_per_step(n, d, ranks)
    return {
        "state_per_rank_latent_GB": 16 * n * d / ranks / 1e9,
        "state_per_rank_data_GB": 16 * n * d / 1e9,
        "bytes_latent_GB": latent / 1e9,
        "bytes_data_GB": dense / 1e9,
        "time_latent_ms": latent / (link_gb_s * 1e9) * 1e3,
        "time_data_s": dense / (link_gb_s * 1e9),
    }


def _meshes(text: str) -> list[tuple[int, int]]:
    """"2x1,2x2" -> [(2, 1), (2, 2)]."""
    meshes = []
    for item in text.split(","):
        parts = item.strip().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"--meshes {text!r}: {item!r} is not DxL (e.g. 2x1,2x2)")
        meshes.append((int(parts[0]), int(parts[1])))
    return meshes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--meshes", type=_meshes, default=MESHES,
                        help="DxL meshes, comma-separated (default: " + ",".join(f"{d}x{l}" for d, l in MESHES) + ")")
    args = parser.parse_args(argv)
    print(machine_line(machine_info("cpu")))
    print(f"d={SHAPE['d_in']}, n={SHAPE['n_latents']}, k={SHAPE['k']}, B={BATCH} (global), fp32, gloo on CPU")
    print("| mesh DxL | data collectives/step | data bytes/step/rank | latent collectives/step | latent bytes/step/rank "
          "| formula (latent) | state/rank MiB | peak RSS MiB | step ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for data, latent in args.meshes:
        world = data * latent
        results = [_measure(data, latent, args.steps)] if world == 1 else run_local(_measure, world, data, latent, args.steps, timeout=600)
        worst = {key: max(r[key] for r in results) for key in results[0]}
        formula = latent_bytes_per_step(BATCH // data, SHAPE["d_in"], SHAPE["k"], latent)
        print(f"| {data}x{latent} | {worst['data_calls']:.0f} | {worst['data_bytes']:,.0f} | {worst['latent_calls']:.0f} | "
              f"{worst['latent_bytes']:,.0f} | {formula:,.0f} | "
              f"{worst['state_bytes'] / 2**20:.1f} | {worst['peak_rss'] / 2**20:.0f} | {worst['step_s'] * 1e3:.0f} |")
    paper = estimate()
    print("\nOn paper, ESM2-15B (d=5120), n=2^24, k=64, B=8192, 32 GPUs, 50 GB/s per GPU:")
    for key, value in paper.items():
        print(f"  {key}: {value:,.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
