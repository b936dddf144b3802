"""SharedNoise: identical streams for identical seeds (DDP ranks), continued across a checkpoint."""
import torch

from bench.feedback.noise import SharedNoise


def test_same_seed_same_stream_and_state_continues_after_load():
    rank0, rank1, other = SharedNoise(5), SharedNoise(5), SharedNoise(6)
    first = torch.randn(3, generator=rank0.generator("cpu"))
    assert torch.equal(first, torch.randn(3, generator=rank1.generator("cpu")))
    assert not torch.equal(first, torch.randn(3, generator=other.generator("cpu")))
    resumed = SharedNoise(5)
    resumed.load(rank0.state())
    assert resumed.state() is not None  # a pending state is saved again if the run stops before drawing
    assert torch.equal(torch.randn(4, generator=rank0.generator("cpu")), torch.randn(4, generator=resumed.generator("cpu")))
