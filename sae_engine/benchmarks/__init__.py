"""Throughput and memory benchmarks against baselines measured in the same run.

``sae-engine bench SUITE [options]`` (or ``python -m sae_engine.benchmarks SUITE``), one suite a
module, all on one harness (:mod:`.harness`: contenders in worker processes, peak-memory probes,
the machine's description, JSON output):

- ``kernels``: ``topk_encode`` / ``sparse_decode`` / forward+backward against the bare GEMM,
  plain PyTorch and sparsify (:mod:`.kernels`);
- ``train-step``: one training step against sparsify and SAELens (:mod:`.train_step`);
- ``esm``: ESM2 extraction against fair-esm's own loop (:mod:`.extraction`);
- ``enrich``: GO enrichment of every feature against goatools (:mod:`.enrichment`);
- ``parallel``: scale-out on gloo, bytes per step and per-rank memory, latent sharding against
  data parallel (:mod:`.parallel`);
- ``parallel-jax``: the JAX mesh, bytes per step read from the compiled step's collectives,
  per-device memory (:mod:`.jax_mesh`).

Every output names the CPU with its vector/matrix features (and the GPU), because the same code
runs 2-9x apart on CPUs with and without bf16 units.
"""
from __future__ import annotations

import importlib
import sys

SUITES = {
    "kernels": ("kernels", None),
    "train-step": ("train_step", None),
    "esm": ("extraction", "esm"),
    "enrich": ("enrichment", "analysis"),
    "parallel": ("parallel", None),
    "parallel-jax": ("jax_mesh", "jax"),
}  # name -> (module, the extra it needs beyond the core install)


def main(argv: list[str] | None = None) -> int:
    """``SUITE [options]``: run one suite's command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUITES:
        given = f" (got {argv[0]!r})" if argv and not argv[0].startswith("-") else ""
        print(f"usage: sae-engine bench {{{','.join(SUITES)}}} [options]; SUITE --help for its options{given}",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module_name, extra = SUITES[argv[0]]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as err:
        if extra is None or err.name is None or err.name.startswith("sae_engine"):
            raise
        module_missing = err.name.split(".")[0]
        print(f"sae-engine bench {argv[0]}: error: needs the '{extra}' extra (module '{module_missing}' is missing): "
              f"pip install 'sae-engine[{extra}]'", file=sys.stderr)
        return 2
    return module.main(argv[1:])
