"""online_softmax against a float64 softmax; low precision judged against torch.softmax's own error.

Also the concept page docs/online_softmax.md: its code links, its numbers and its figure script.
"""
import importlib.util
import re
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# docs/online_softmax.md and the script that makes its numbers and figures

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "online_softmax.md"
CODE_LINK = re.compile(r"\[`([^`]+)`\]\(\.\./(kernels/\w+\.py)#L(\d+)\)")


def load_plot_script():
    spec = importlib.util.spec_from_file_location("plot_online_softmax", REPO / "scripts" / "bench" / "plot_online_softmax.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concept_page_links_point_at_the_code_they_quote():
    # each [`code`](../kernels/x.py#L<n>) link quotes its line: an edit that moves or changes it
    # fails here, naming the link to update
    links = CODE_LINK.findall(PAGE.read_text())
    assert len(links) >= 20
    assert {path for _, path, _ in links} == {"kernels/online.py", "kernels/flash_triton.py"}
    for code, path, line in links:
        lines = (REPO / path).read_text().splitlines()
        n = int(line)
        assert n <= len(lines) and code in lines[n - 1], (
            f"docs/online_softmax.md links `{code}` to {path}#L{n}, which reads: "
            f"{lines[n - 1].strip() if n <= len(lines) else '(past the end)'}; update the link")


def test_concept_page_numbers_are_the_scripts():
    script = load_plot_script()
    page_lines = {line.strip() for line in PAGE.read_text().splitlines()}
    printed = script.walk(script.EXAMPLE) + "\n" + script.fp16_table()  # walk() checks itself in float64
    for line in printed.splitlines():
        assert not line.strip() or line.strip() in page_lines, line


def test_concept_page_python_runs():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), {})


def test_figure_script_writes_both_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert load_plot_script().main(["--out-dir", str(tmp_path)]) == 0
    for name in ("online_softmax_running_stats.png", "online_softmax_fp16.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (REPO / "docs" / name).is_file()  # the page's images are committed
    assert "| 3 | 2, 6, 1 | 6 |" in capsys.readouterr().out
