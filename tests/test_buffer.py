"""The ring buffer and its sources: exact accounting, shuffling, end of data, exact resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_engine.training.buffer import RingBuffer
from sae_engine.data.sources import ArraySource, ShardSource, SyntheticSource


def _ids(n: int, d: int = 3) -> torch.Tensor:
    """Vectors whose first coordinate is their position in the source."""
    data = torch.zeros(n, d)
    data[:, 0] = torch.arange(n, dtype=torch.float32)
    return data


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("n,capacity,batch,chunk", [(1000, 64, 16, 7), (257, 100, 33, 50), (10, 64, 4, 3)])
def test_every_vector_is_served_exactly_once(background, n, capacity, batch, chunk):
    buffer = RingBuffer(ArraySource(_ids(n), chunk_size=chunk), capacity, seed=1, background=background)
    served = torch.cat([b[:, 0] for b in buffer.batches(batch)]).long()
    assert sorted(served.tolist()) == list(range(n))
    assert buffer.tokens_read == buffer.tokens_served == n


def test_batches_are_shuffled_and_mix_across_the_source():
    buffer = RingBuffer(ArraySource(_ids(4000), chunk_size=100), 1000, seed=2, background=False)
    first = buffer.next_batch(200)[:, 0]
    assert not torch.equal(first, first.sort().values)
    assert first.max() - first.min() > 500  # drawn from across the buffer, not one chunk


def test_drop_last_stops_before_a_short_batch():
    buffer = RingBuffer(ArraySource(_ids(100), chunk_size=9), 40, background=False)
    sizes = [len(b) for b in buffer.batches(30, drop_last=True)]
    assert sizes == [30, 30, 30]


@pytest.mark.parametrize("stop_after", [0, 1, 5, 13])
def test_resume_from_state_serves_what_an_uninterrupted_buffer_would(stop_after):
    def make():
        return RingBuffer(ArraySource(_ids(700), chunk_size=11), 128, seed=3, background=True)

    reference = [b[:, 0].tolist() for b in make().batches(24)]
    first = make()
    for _ in range(stop_after):
        first.next_batch(24)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b[:, 0].tolist() for b in resumed.batches(24)]
    assert rest == reference[stop_after:]


def test_shard_source_streams_memory_mapped_files_in_order(tmp_path):
    data = _ids(50, d=4).numpy()
    paths = []
    for i, part in enumerate(np.split(data, [20, 35])):
        paths.append(tmp_path / f"shard{i}.npy")
        np.save(paths[-1], part)
    source = ShardSource(paths, chunk_size=8)
    assert len(source) == 50 and source.d == 4
    assert torch.equal(torch.cat(list(source.iter_from(0))), torch.from_numpy(data))
    assert torch.equal(torch.cat(list(source.iter_from(27))), torch.from_numpy(data[27:]))


def test_shard_source_names_the_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        ShardSource([tmp_path / "missing.npy"])
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="junk.npy"):
        ShardSource([tmp_path / "junk.npy"])
    np.save(tmp_path / "a.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="a.npy: d=4, b.npy: d=5"):
        ShardSource([tmp_path / "a.npy", tmp_path / "b.npy"])


def test_synthetic_source_is_reproducible_from_any_offset():
    source = SyntheticSource(d=8, total=1000, seed=4, chunk_size=64)
    whole = torch.cat(list(source.iter_from(0)))
    assert whole.shape == (1000, 8)
    assert torch.equal(torch.cat(list(source.iter_from(333))), whole[333:])


def test_source_chunk_of_the_wrong_width_is_reported():
    class Bad:
        d = 4

        def iter_from(self, start):
            yield torch.zeros(5, 3)

    with pytest.raises(ValueError, match=r"shape \(5, 3\); expected \[m, 4\]"):
        RingBuffer(Bad(), 16, background=False).next_batch(4)


@pytest.mark.gpu
def test_cuda_buffer_serves_every_vector_once_with_background_copies():
    buffer = RingBuffer(ArraySource(_ids(5000), chunk_size=97), 1024, device="cuda", dtype=torch.float32, seed=5)
    served = torch.cat([b[:, 0].cpu() for b in buffer.batches(128)]).long()
    assert sorted(served.tolist()) == list(range(5000))
