"""Data-parallel feeds: each rank's share of the one global order, read from a disjoint part of
the stream, resumable from any mesh's buffer state."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from sae_engine.training.buffer import RingBuffer
from sae_engine.parallel.feed import KeepRowsFeed, SharedOrderFeed, make_feed
from sae_engine.data.sources import ArraySource, OffsetSource, PairedSource, ShardSource, SyntheticSource

CAPACITY, BATCH, SEED = 96, 24, 5


def _ids(n: int, d: int = 3) -> torch.Tensor:
    """Vectors whose first coordinate is their position in the source."""
    data = torch.randn(n, d)
    data[:, 0] = torch.arange(n, dtype=torch.float32)
    return data


class StreamOnly:
    """A source that can only be streamed in order (as ESM2 run live): no ``rows``."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data, self.d = data, data.shape[1]

    def __len__(self) -> int:
        return len(self.data)

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        for lo in range(start, len(self), 10):
            yield self.data[lo : lo + 10]


def _sources(tmp_path) -> dict:
    data = _ids(700)
    paths = []
    for i, part in enumerate(np.split(data.numpy(), [250, 251, 600])):
        paths.append(tmp_path / f"s{i}.npy")
        np.save(paths[-1], part)
    return {
        "array": ArraySource(data, chunk_size=13),
        "shards": ShardSource(paths, chunk_size=64),
        "synthetic": SyntheticSource(3, 700, seed=2, chunk_size=50),
        "offset": OffsetSource(ArraySource(data, chunk_size=13), 100),
        "paired": PairedSource(ArraySource(data[:, :2]), ArraySource(data[:, 2:])),
    }


def _global_batches(source) -> list[torch.Tensor]:
    return list(RingBuffer(source, CAPACITY, seed=SEED, background=True).batches(BATCH, drop_last=True))


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_shared_order_shares_are_the_global_batches_read_disjointly(tmp_path, parts):
    for name, source in _sources(tmp_path).items():
        want = _global_batches(source)
        feeds = [make_feed(source, CAPACITY, dtype=torch.float32, device=torch.device("cpu"), seed=SEED,
                           data_rank=r, data=parts) for r in range(parts)]
        assert all(isinstance(feed, SharedOrderFeed) for feed in feeds)
        got = [torch.cat([feed.next_batch(BATCH, drop_last=True) for feed in feeds]) for _ in want]
        assert all(feed.next_batch(BATCH, drop_last=True) is None for feed in feeds), name
        for step, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w.float()), f"{name}: batch {step}"
        # Each rank read only its share: together every served vector once.
        assert [feed.rows_read for feed in feeds] == [len(want) * BATCH // parts] * parts, name


def test_stream_only_sources_keep_their_rows_of_the_whole_stream():
    data = _ids(300)
    want = _global_batches(StreamOnly(data))
    feeds = [make_feed(StreamOnly(data), CAPACITY, dtype=torch.float32, device=torch.device("cpu"), seed=SEED,
                       data_rank=r, data=2) for r in range(2)]
    assert all(isinstance(feed, KeepRowsFeed) for feed in feeds)
    for w in want:
        assert torch.equal(torch.cat([feed.next_batch(BATCH, drop_last=True) for feed in feeds]), w)


@pytest.mark.parametrize("stop_after", [0, 3, 9])
def test_resume_between_one_process_and_data_ranks_is_exact(stop_after):
    source = ArraySource(_ids(600), chunk_size=17)
    want = _global_batches(source)

    def shared(rank: int) -> SharedOrderFeed:
        return make_feed(source, CAPACITY, dtype=torch.float32, device=torch.device("cpu"), seed=SEED,
                         data_rank=rank, data=2)

    # Data ranks -> one process: the plain buffer reads the unserved vectors back by position.
    ranks = [shared(0), shared(1)]
    for _ in range(stop_after):
        for feed in ranks:
            feed.next_batch(BATCH, drop_last=True)
    state = ranks[0].state_dict()
    assert "unserved" not in state and state["unserved_positions"].dtype == torch.int64
    plain = RingBuffer(source, CAPACITY, seed=SEED)
    plain.load_state_dict(state)
    assert [b[:, 0].tolist() for b in plain.batches(BATCH, drop_last=True)] == \
        [w[:, 0].tolist() for w in want[stop_after:]]

    # One process -> data ranks: the positions the plain buffer kept beside its vectors.
    plain = RingBuffer(source, CAPACITY, seed=SEED)
    for _ in range(stop_after):
        plain.next_batch(BATCH, drop_last=True)
    ranks = [shared(0), shared(1)]
    for feed in ranks:
        feed.load_state_dict(plain.state_dict())
    for w in want[stop_after:]:
        assert torch.equal(torch.cat([feed.next_batch(BATCH, drop_last=True) for feed in ranks]), w)


def test_buffer_state_without_positions_is_a_clear_error_for_data_ranks():
    source = ArraySource(_ids(200))
    state = RingBuffer(source, CAPACITY, seed=SEED).state_dict()
    del state["unserved_positions"]  # as written before positions were kept
    feed = make_feed(source, CAPACITY, dtype=torch.float32, device=torch.device("cpu"), seed=SEED, data_rank=0, data=2)
    with pytest.raises(ValueError, match="resume it with parallel.data = 1"):
        feed.load_state_dict(state)


def _train_rank(overrides: list[str], kill_at: int | None = None) -> tuple[str, int, int]:
    """One data rank's run; with kill_at, rank 1 sends itself SIGKILL before that step."""
    import os

    import torch.distributed as dist
    from kill import die_before_step

    from sae_engine.config import load_config
    from sae_engine.data.registry import build_source
    from sae_engine.training.trainer import Trainer

    config = load_config(None, overrides)
    trainer = Trainer(config, build_source(config))
    if kill_at is not None and os.environ["RANK"] == "1":
        die_before_step(trainer, kill_at)
    step = trainer.run().step
    dist.destroy_process_group()
    return type(trainer.buffer).__name__, trainer.buffer.rows_read, step


def _overrides(out_dir, steps: int) -> list[str]:
    return ["model.d_in=8", "model.n_latents=16", "model.k=2", "data.synthetic.tokens=1088",
            "data.buffer_size=128", "data.eval_tokens=64", "train.batch_size=32", f"train.max_tokens={32 * steps}",
            "train.progress=false", "train.precision='fp32'", "train.device='cpu'", "parallel.data=2",
            "train.checkpoint_every=3", f"train.out_dir='{out_dir}'"]


def test_data_ranks_read_disjoint_shares_and_resume_exactly_after_kill(tmp_path):
    from sae_engine.checkpoints import latest_checkpoint
    from sae_engine.config import load_config
    from sae_engine.checkpoints.keys import RING_KEYS as BUFFER_KEYS
    from sae_engine.checkpoints.dcp import load_rows
    from sae_engine.parallel.launch import run_local
    from sae_engine.training.torch_backend import TorchSAE

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert run_local(_train_rank, 2, _overrides(clean, 8), timeout=120) == [("SharedOrderFeed", 128, 8)] * 2
    with pytest.raises(Exception, match="signal|SIGKILL|exit"):
        run_local(_train_rank, 2, _overrides(killed, 8), 5, timeout=120)
    assert latest_checkpoint(killed).name == "step_000000003"
    # Resumed, each rank reads the 5 batches' shares it had not trained on: no vector twice or lost.
    assert run_local(_train_rank, 2, _overrides(killed, 8), timeout=120) == [("SharedOrderFeed", 80, 8)] * 2

    def state(run):
        config = load_config(None, _overrides(run, 8))
        like = TorchSAE(config, torch.device("cpu")).state_tensors()
        return load_rows(latest_checkpoint(run), like, 16, None, BUFFER_KEYS)

    got, want = state(killed), state(clean)
    assert "buffer.unserved" not in want and "buffer.unserved_positions" in want  # positions, not vectors
    for key, value in want.items():
        assert torch.equal(got[key], value), key
