import json

import pytest
import torch

from training.shuffle_buffer import ActivationChunk, ShufflingBuffer, first_fill_stats


class CountingSource:
    """A finite stream of `n` vectors (vector i = [i, i]) in chunks of varying size, repeated per epoch."""

    def __init__(self, n=257, sizes=(5, 17, 1, 30)):
        self.n, self.sizes, self.pos = n, sizes, {"epoch": 0, "start": 0, "chunk": 0}

    def __iter__(self):
        while True:
            p = self.pos
            size = self.sizes[p["chunk"] % len(self.sizes)]
            stop = min(p["start"] + size, self.n)
            vectors = torch.arange(p["start"], stop, dtype=torch.float32)[:, None].repeat(1, 2)
            epoch = p["epoch"]
            self.pos = {"epoch": epoch + 1, "start": 0, "chunk": 0} if stop == self.n else \
                {"epoch": epoch, "start": stop, "chunk": p["chunk"] + 1}
            yield ActivationChunk(epoch, vectors)

    def state_dict(self):
        return dict(self.pos)

    def load_state_dict(self, state):
        self.pos = dict(state)


def _ids(batch):
    return batch[:, 0].long().tolist()


@pytest.mark.parametrize("capacity,batch", [(64, 8), (40, 7), (1000, 32)])
def test_every_vector_once_per_epoch_and_never_over_capacity(capacity, batch):
    n = 257
    buf = ShufflingBuffer(CountingSource(n), capacity, batch, seed=3)
    served = []
    for _ in range(3 * n // batch):
        served += _ids(buf.next_batch())
        assert buf.held <= capacity and (buf.store is None or len(buf.store) == capacity)
    for epoch in range(2):
        assert sorted(served[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert served[:n] != sorted(served[:n])  # shuffled


def test_batches_mix_the_stream():
    buf = ShufflingBuffer(CountingSource(10_000, sizes=(50,)), 2000, 100, seed=0)
    first = _ids(buf.next_batch())
    assert max(first) - min(first) > 1000  # from across the buffer, not one chunk


def test_resume_gives_the_same_batches():
    buf = ShufflingBuffer(CountingSource(), 64, 8, seed=1)
    for _ in range(45):
        buf.next_batch()
    state = json.loads(json.dumps(buf.state_dict()))
    tensors = {k: v.clone() for k, v in buf.state_tensors().items()}
    expected = [buf.next_batch() for _ in range(60)]
    again = ShufflingBuffer(CountingSource(), 64, 8, seed=1)
    again.load_state_dict(state, tensors)
    assert all(torch.equal(a, b) for a, b in zip(expected, [again.next_batch() for _ in range(60)]))
    with pytest.raises(ValueError, match="does not match"):
        ShufflingBuffer(CountingSource(), 64, 16, seed=1).load_state_dict(state, tensors)


def test_first_fill_stats():
    buf = ShufflingBuffer(CountingSource(), 64, 8)
    stats = first_fill_stats(buf)
    x = torch.arange(64, dtype=torch.float64)[:, None].repeat(1, 2)
    assert stats.count == 64
    assert torch.allclose(stats.mean.double(), x.mean(0))
    assert stats.variance == pytest.approx(float((x - x.mean(0)).pow(2).sum(-1).mean()))
    assert stats.scale == pytest.approx(float((2 / x.pow(2).sum(-1).mean()) ** 0.5))


def test_capacity_must_hold_two_batches():
    with pytest.raises(ValueError, match="at least two batches"):
        ShufflingBuffer(CountingSource(), 10, 8)
