"""``edropout.host``'s packing: several tensors of any dtypes and shapes travel as one buffer of bytes (one copy to
the host in ``read``, one to the device in ``upload``) and come back bit for bit, each an aligned view."""
import torch

from edropout import host


def _bytes(t):
    return t.reshape(-1).view(torch.uint8)


def test_packed_tensors_come_back_bit_for_bit_as_aligned_views():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.rand(3, 5, generator=g) < 0.5, torch.randn(7, dtype=torch.float64, generator=g),
               torch.randint(-9, 9, (2, 3), dtype=torch.int32, generator=g),
               torch.randn(5, generator=g).to(torch.bfloat16), torch.tensor(float("nan")), torch.zeros(0, 4),
               torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g), torch.randn(2, 1, 3, generator=g)]
    flat, specs = host.pack(tensors)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    assert flat.numel() == sum(t.numel() * t.element_size() for t in tensors)
    moved = flat.clone()  # what a copy to another device gives: the same bytes in a new buffer
    out = host.unpack(moved, specs)
    for before, after in zip(tensors, out):
        assert after.dtype == before.dtype and after.shape == before.shape
        assert torch.equal(_bytes(after), _bytes(before))
        assert after.untyped_storage().data_ptr() == moved.untyped_storage().data_ptr(), "a view of the buffer"
        assert after.data_ptr() % after.element_size() == 0, "aligned to its element size"


def test_read_and_upload_give_the_values():
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(4, 3, generator=g), torch.rand(6, generator=g) < 0.3, torch.tensor(3, dtype=torch.int64)]
    reads = host.reads
    for before, after in zip(tensors, host.read(*tensors)):
        assert after.dtype == before.dtype and torch.equal(after, before)
    assert host.reads == reads + 1
    for before, after in zip(tensors, host.upload(tensors, "cpu")):
        assert torch.equal(after, before)
