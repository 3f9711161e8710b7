"""The JAX mesh: bytes each device sends per step, counted from the collectives XLA compiled
into the training step, per-device state memory, and step time, at the torch suite's shape.

    sae-engine bench parallel-jax [--steps 5]

XLA inserts the mesh's collectives itself, so they are read from the compiled step's HLO:
each all-gather, all-reduce and reduce-scatter with its shape and replica group, priced with
the ring algorithms' bytes (as ``parallel.comm`` counts torch's). On a CPU's host devices the
step times check the logic, not speed.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

SHAPE = {"d_in": 64, "n_latents": 16384, "k": 16}
BATCH = 512
MESHES = [(1, 1), (1, 2), (2, 1), (1, 4), (4, 1), (2, 2)]
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_OP = re.compile(r"= (?P<shape>\(.*?\)|\S+) (?P<kind>all-gather|all-reduce|reduce-scatter)(?:-start)?\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO result shape: one array ``f32[4,8]{1,0}`` or a tuple of them."""
    total = 0
    for match in _ARRAY.finditer(shape):
        count = 1
        for dim in filter(None, match["dims"].split(",")):
            count *= int(dim)
        total += count * _BYTES[match["dtype"]]
    return total


def _group_size(line: str) -> int:
    """Devices in each replica group of a collective's HLO line (explicit, iota or mesh-axis form)."""
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if explicit:
        return len(explicit[1].split(","))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh[1]))
        size = 1
        for axis in re.findall(r"'(\w+)'", mesh[2]):
            size *= int(sizes[axis])
        return size
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if iota:
        return int(iota[1].split(",")[-1])
    raise ValueError(f"cannot read the replica groups of: {line[:200]}")


def collectives(hlo: str) -> list[dict]:
    """Every collective of a compiled module's text: kind, group size, result bytes and the bytes
    one device sends (ring: all-gather (p-1)/p of the result, all-reduce 2(p-1)/p, reduce-scatter
    (p-1) times its result). Groups of one device move nothing."""
    out = []
    for line in hlo.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        p, size = _group_size(line), _shape_bytes(match["shape"])
        sent = {"all-gather": (p - 1) / p * size, "all-reduce": 2 * (p - 1) / p * size,
                "reduce-scatter": (p - 1) * size}[match["kind"]]
        out.append({"kind": match["kind"], "group": p, "bytes": size, "sent": sent})
    return out


def step_collectives(sae, x) -> list[dict]:
    """The collectives of ``sae``'s compiled training step on batch ``x`` (a JAX array as placed)."""
    import jax.numpy as jnp

    from sae_engine.training.jax_backend import _train_step

    sae.state, sae.opt_state = sae.layout.place_state((sae.state, sae.opt_state), x)
    sae._placed_for = x.sharding
    lowered = _train_step.lower(sae.graphdef, sae._train, sae.state, sae.opt_state, x, x, jnp.float32(1e-4),
                                sae.aux_active)
    return collectives(lowered.compile().as_text())


def _measure(data: int, latent: int, steps: int) -> dict:
    import jax
    import torch

    from sae_engine.config import RunConfig
    from sae_engine.training.jax_backend import JaxSAE
    from sae_engine.parallel.jax_mesh import build_jax_mesh, sharded_jax_backend

    config = RunConfig.from_dict({"model": SHAPE, "train": {"batch_size": BATCH, "precision": "fp32", "device": "cpu",
                                                            "warmup_steps": 0}})
    batch = torch.randn(BATCH, SHAPE["d_in"], generator=torch.Generator().manual_seed(0))
    sae = (JaxSAE(config, "fp32") if data * latent == 1
           else sharded_jax_backend(config, build_jax_mesh(data, latent), "fp32"))
    sae.initialize(batch, batch)
    x = sae._in(batch)
    found = step_collectives(sae, x)
    for _ in range(2):
        sae.train_step_arrays(x, x, 1e-4)
    jax.block_until_ready(sae.state)
    start = time.perf_counter()
    for _ in range(steps):
        metrics = sae.train_step_arrays(x, x, 1e-4)
    jax.block_until_ready(metrics)
    elapsed = (time.perf_counter() - start) / steps
    device = jax.devices()[0]
    state = sum(shard.data.nbytes for leaf in jax.tree.leaves((sae.state, sae.opt_state)) if hasattr(leaf, "addressable_shards")
                for shard in leaf.addressable_shards if shard.device == device)
    largest = max((c for c in found if c["sent"] > 0), key=lambda c: c["sent"], default=None)
    return {"sent": sum(c["sent"] for c in found), "count": sum(c["sent"] > 0 for c in found),
            "largest": largest, "state_bytes": state, "step_s": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    devices = max(d * l for d, l in MESHES)
    if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    import jax

    from sae_engine.benchmarks.harness import machine_info, machine_line

    print(machine_line(machine_info("cpu", ("jax", "jaxlib"))))
    print(f"d={SHAPE['d_in']}, n={SHAPE['n_latents']}, k={SHAPE['k']}, B={BATCH} (global), fp32, "
          f"{len(jax.devices())} {jax.devices()[0].platform} devices")
    print("| mesh DxL | bytes sent/step/device | collectives | largest (kind, group, bytes) | state/device MiB | step ms |")
    print("|---|---|---|---|---|---|")
    for data, latent in MESHES:
        r = _measure(data, latent, args.steps)
        big = r["largest"]
        largest = "none" if big is None else f"{big['kind']}, {big['group']}, {big['bytes']:,}"
        print(f"| {data}x{latent} | {r['sent']:,.0f} | {r['count']} | {largest} | {r['state_bytes'] / 2**20:.1f} | "
              f"{r['step_s'] * 1e3:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
