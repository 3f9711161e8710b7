"""Training logs: a JSONL file of metrics and a PNG of the curves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlLog:
    """Append-only metrics log, one JSON object a line; truncated past a step on resume."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (they belong to work a resume will redo)."""
        if not self.path.exists():
            return
        kept = [line for line in self.read() if line.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Plot loss, FVU, L0, dead fraction and throughput against tokens into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fvu", "FVU (train)", "eval_fvu"), ("l0", "L0", None), ("aux_loss", "AuxK loss", None),
              ("dead_fraction", "dead latents", None), ("tokens_per_s", "tokens / s", None)]
    train = [r for r in records if "fvu" in r]
    if not train:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title, eval_key) in zip(axes, panels):
        ax.plot([r["tokens"] for r in train], [r.get(key, float("nan")) for r in train], label="train")
        if eval_key:
            evals = [r for r in records if eval_key in r]
            if evals:
                ax.plot([r["tokens"] for r in evals], [r[eval_key] for r in evals], "o-", label="held-out")
                ax.legend()
        ax.set_title(title)
        ax.set_xlabel("tokens")
        if key == "fvu":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
