"""online_softmax against a float64 softmax; low precision judged against torch.softmax's own error."""
import pytest
import torch

from kernels import online_softmax

# Extra error allowed on top of 2x torch.softmax's error in the same dtype.
SLACK = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(x.double(), dim=dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 128, 300, 1025])
def test_matches_softmax(dtype, n):
    torch.manual_seed(n)
    x = (torch.randn(6, n) * 4).to(dtype)
    out = online_softmax(x, block_size=128)  # 300 and 1025 leave a partial last block
    assert out.dtype == dtype
    ref = reference(x)
    err = (out.double() - ref).abs().max().item()
    err_torch = (torch.softmax(x, dim=-1).double() - ref).abs().max().item()
    assert err <= 2 * err_torch + SLACK[dtype], (err, err_torch)


@pytest.mark.parametrize("block_size", [1, 5, 64, 4096])
def test_block_size_does_not_change_result(block_size):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 200)
    torch.testing.assert_close(online_softmax(x, block_size=block_size), torch.softmax(x, -1))


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_other_dims(dim):
    torch.manual_seed(1)
    x = torch.randn(33, 17, 5)
    torch.testing.assert_close(online_softmax(x, dim=dim, block_size=8), torch.softmax(x, dim=dim))


def test_neg_inf_entries():
    torch.manual_seed(2)
    x = torch.randn(8, 300)
    x[torch.rand_like(x) < 0.3] = float("-inf")
    x[:, 0] = float("-inf")  # the first block starts masked for every row
    out = online_softmax(x, block_size=64)
    torch.testing.assert_close(out, torch.softmax(x, -1))
    assert (out[x == float("-inf")] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fully_masked_row_gives_zeros_not_nan(dtype):
    x = torch.randn(4, 100).to(dtype)
    x[1] = float("-inf")
    out = online_softmax(x, block_size=32)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    keep = [0, 2, 3]
    torch.testing.assert_close(out[keep], torch.softmax(x[keep].float(), -1).to(dtype))
    # The documented difference: torch.softmax gives NaN for a fully masked row.
    assert torch.isnan(torch.softmax(x.float(), -1)[1]).all()


@pytest.mark.parametrize("magnitude", [1e4, 6e4])
def test_fp16_large_logits_do_not_overflow(magnitude):
    torch.manual_seed(3)
    # values in [-magnitude, magnitude], spaced apart so the softmax is not one-hot everywhere
    x = (torch.rand(4, 500) * 2 - 1) * magnitude
    x[:, :3] = torch.tensor([magnitude, magnitude - 1.0, magnitude - 2.0])  # close competitors
    x = x.half()
    assert torch.isfinite(x).all()

    # Without subtracting the max, exp overflows in fp16: inf / inf = NaN.
    unsafe = torch.exp(x) / torch.exp(x).sum(dim=-1, keepdim=True)
    assert not torch.isfinite(unsafe).all()

    out = online_softmax(x, block_size=128)
    assert torch.isfinite(out).all()
    ref = reference(x)
    assert (out.double() - ref).abs().max().item() < 2e-3
    torch.testing.assert_close(out.double().sum(-1), torch.ones(4, dtype=torch.float64), atol=2e-3, rtol=0)


def test_rejects_integer_input():
    with pytest.raises(ValueError):
        online_softmax(torch.arange(4))
