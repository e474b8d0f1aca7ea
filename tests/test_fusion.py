"""fuse_embeddings: text-id gather + in-order scatter of vision/audio rows."""
import numpy as np
import pytest
import torch

import vita_engine
from vita_engine import ops
from vita_engine.ops import reference as ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("idtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,H,n_mm", [(1, 17, 0), (7, 33, 3), (300, 128, 256), (2500, 64, 1300)])
def test_fuse_matches_reference(device, dtype, idtype, T, H, n_mm):
    V = 1000
    ids = torch.randint(0, V, (T,))
    if n_mm:
        pos = torch.randperm(T)[:n_mm]
        ids[pos] = torch.where(torch.rand(n_mm) < 0.5, -200, -500)
    ids = ids.to(idtype).to(device)
    E = torch.randn(V, H).to(dtype=dtype, device=device)
    M = torch.randn(n_mm, H).to(dtype=dtype, device=device) if n_mm else None
    out = ops.fuse_embeddings(ids, E, M)
    assert out.shape == (T, H) and out.dtype == dtype
    expect = ref.fuse_embeddings(ids.cpu(), E.cpu(), None if M is None else M.cpu())
    assert torch.equal(out.cpu(), expect)  # a pure copy: bit-exact


def test_fuse_writes_every_row_of_poisoned_output():
    ids = torch.tensor([5, -1, 2, -1, -1, 0])
    E = torch.randn(10, 12)
    M = torch.randn(3, 12)
    out = torch.full((6, 12), float("nan"))
    vita_engine._C.fuse_embeddings(ids, E, M, out)
    assert torch.equal(out, ref.fuse_embeddings(ids, E, M))


def test_fuse_order_of_mm_rows():
    ids = torch.tensor([-1, 3, -1, -1])
    E = torch.zeros(5, 2)
    M = torch.arange(6.0).view(3, 2)
    out = ops.fuse_embeddings(ids, E, M)
    assert out[0].tolist() == [0, 1] and out[2].tolist() == [2, 3] and out[3].tolist() == [4, 5]


def test_fuse_strided_embedding_and_numpy():
    E = torch.randn(20, 16)[:, :8]  # strided rows
    ids = np.array([1, -7, 3], dtype=np.int64)
    M = np.random.randn(1, 8).astype(np.float32)
    out = np.empty((3, 8), np.float32)
    vita_engine._C.fuse_embeddings(ids, E, M, out)
    np.testing.assert_array_equal(out[0], E[1].numpy())
    np.testing.assert_array_equal(out[1], M[0])


@pytest.mark.parametrize(
    "ids, n_mm, match",
    [
        ([1, -1, -1], 1, "input_ids has 2 multimodal placeholder rows .id < 0. but mm_features has 1 rows"),
        ([1, 2], 1, "has 0 multimodal placeholder rows .* but mm_features has 1 rows"),
        ([1, -1], 0, "has 1 multimodal placeholder rows .* but mm_features has 0 rows"),
        ([1, 10], 0, r"input_ids\[1\] = 10 is out of range for embed_weight with 10 rows"),
    ],
)
def test_fuse_errors(device, ids, n_mm, match):
    E = torch.randn(10, 4, device=device)
    M = torch.randn(n_mm, 4, device=device) if n_mm else None
    with pytest.raises(ValueError, match=match.replace(r"input_ids\[1\] = 10", r"input_ids\[1\]" if device == "cuda" else r"input_ids\[1\] = 10")):
        ops.fuse_embeddings(torch.tensor(ids, device=device), E, M)


def test_fuse_bad_types():
    with pytest.raises(TypeError, match="input_ids must be int32 or int64"):
        ops.fuse_embeddings(torch.tensor([1.0]), torch.randn(3, 4))
    with pytest.raises(ValueError, match="mm_features dim 1 .hidden of embed_weight. must be 4"):
        ops.fuse_embeddings(torch.tensor([-1]), torch.randn(3, 4), torch.randn(1, 5))
    with pytest.raises(TypeError, match="mm_features must have the dtype of embed_weight"):
        ops.fuse_embeddings(torch.tensor([-1]), torch.randn(3, 4), torch.randn(1, 4, dtype=torch.float16))
