"""The decode-attention kernel's semantics against `matmul_attention`, in float32 on the CPU.

`split_reference` is the kernel's math written in torch, in the kernel's own block structure:
per (row, key head), the splits of the key columns, tiles of `block_n` columns with an online
softmax, columns the mask hides from every query left unread, then the splits combined. The Triton
kernels themselves run here under Triton's interpreter when Triton is installed (CUDA builds of
torch bring it; CI's CPU build does not); on a GPU, `benchmarks/gpu.py --sections checks` runs them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config

from specbench.engine.attention import matmul_attention, ragged_mask
from specbench.engine.decode_attention import block_sizes, columns_per_split, decode_attention
from specbench.engine.tree import ancestor_matrix

SCALING = 0.37


def split_reference(query, key, value, mask, scaling: float, split_columns: int) -> torch.Tensor:
    """The kernel's computation in torch: [rows, n, heads, dim] (see the module docstring)."""
    rows, heads, n, dim = query.shape
    key_heads, width = key.shape[1], mask.shape[-1]
    group = heads // key_heads
    _, block_n, _ = block_sizes(group * n, dim)
    queries = query.reshape(rows, key_heads, group * n, dim)  # vector i: head i // n of the group, token i % n
    additive = mask[:, :, None].expand(rows, 1, group, n, width).reshape(rows, 1, group * n, width).float()
    visible = additive > torch.finfo(mask.dtype).min
    partials = []
    for first in range(0, width, split_columns):
        last = min(first + split_columns, width)
        running_max = torch.full((rows, key_heads, group * n), -torch.inf)
        running_sum = torch.zeros(rows, key_heads, group * n)
        accumulated = torch.zeros(rows, key_heads, group * n, dim)
        for start in range(first, last, block_n):
            columns = slice(start, min(start + block_n, last))
            read = visible[..., columns].any(2)[..., None]  # [rows, 1, columns, 1]: some query of the row sees it
            keys = torch.where(read, key[:, :, columns], 0.0)
            values = torch.where(read, value[:, :, columns], 0.0)
            scores = queries @ keys.transpose(-1, -2) * scaling
            scores = torch.where(visible[..., columns], scores + additive[..., columns], -torch.inf)
            new_max = torch.maximum(running_max, scores.amax(-1))
            shift = torch.where(new_max == -torch.inf, 0.0, new_max)
            weights = torch.exp(scores - shift[..., None])
            rescale = torch.exp(running_max - shift)
            running_sum = running_sum * rescale + weights.sum(-1)
            accumulated = accumulated * rescale[..., None] + weights @ values
            running_max = new_max
        partials.append((running_max, running_sum, accumulated))
    total_max = torch.stack([split_max for split_max, _, _ in partials]).amax(0)
    shift = torch.where(total_max == -torch.inf, 0.0, total_max)
    total_sum = sum(split_sum * torch.exp(split_max - shift) for split_max, split_sum, _ in partials)
    total = sum(values * torch.exp(split_max - shift)[..., None] for split_max, _, values in partials)
    output = total / torch.where(total_sum > 0, total_sum, 1.0)[..., None]
    return output.reshape(rows, heads, n, dim).transpose(1, 2)


def engine_mask(rows: int, n: int, cached: int, width: int, generator: torch.Generator, tree: bool = False):
    """An engine mask over a ragged batch: holes in the cache, padding slots, a row fed nothing, one with no cache."""
    cached_valid = torch.rand(rows, cached, generator=generator) < 0.7
    cached_valid[0] = False  # its first slot sees one column: itself
    lengths = torch.randint(1, n + 1, (rows,), generator=generator)
    lengths[-1] = 0  # a row fed only padding (a finished row): its slots see its cache and themselves
    slot_valid = torch.arange(n)[None, :] < lengths[:, None]
    new_visible = torch.ones(rows, n, n, dtype=torch.bool).tril_()
    if tree:
        parents = [-1] + [int(torch.randint(0, slot, (), generator=generator)) for slot in range(1, n)]
        new_visible[:] = ancestor_matrix(parents)
    new_visible = (new_visible & slot_valid[:, None, :]) | torch.eye(n, dtype=torch.bool)
    positions = torch.arange(n).expand(rows, n)
    return ragged_mask(cached_valid, new_visible, positions, width, torch.float32, GPT2Config(n_layer=1))


CASES = [  # rows, heads, key heads, n, dim, cached columns, width, tree
    (3, 2, 2, 1, 16, 70, 96, False),
    (4, 4, 2, 5, 8, 40, 64, False),  # grouped heads (Llama-style), k + 1 tokens
    (2, 8, 1, 3, 24, 100, 128, False),  # one key head, a head size that is no power of two
    (3, 2, 2, 9, 64, 50, 64, True),  # a token tree of 9 nodes
    (2, 4, 4, 4, 32, 150, 192, True),
]


def random_case(rows, heads, key_heads, n, dim, cached, width, tree, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, heads, n, dim, generator=generator)
    buffer = width + 7  # a static buffer is longer than the width attended over
    key, value = (torch.randn(rows, key_heads, buffer, dim, generator=generator) for _ in range(2))
    mask = engine_mask(rows, n, cached, width, generator, tree)
    return query, key, value, mask


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("splits", ["one", "tiles", "automatic"])
def test_split_reference_equals_matmul_attention(case, splits):
    query, key, value, mask = random_case(*case)
    rows, heads, n, dim, width = query.shape[0], query.shape[1], query.shape[2], query.shape[3], mask.shape[-1]
    _, block_n, _ = block_sizes(heads // key.shape[1] * n, dim)
    split = {"one": width, "tiles": block_n, "automatic": columns_per_split(rows * key.shape[1], width, block_n, 64)}
    expected = matmul_attention(query, key[:, :, :width], value[:, :, :width], mask, SCALING)
    actual = split_reference(query, key, value, mask, SCALING, split[splits])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_columns_per_split_covers_the_width_in_whole_tiles():
    assert columns_per_split(pairs=16, width=256, block_n=32, programs=528) == 32  # one row of GPT-J: 8 splits
    assert columns_per_split(pairs=64, width=256, block_n=32, programs=528) == 32
    assert columns_per_split(pairs=256, width=256, block_n=32, programs=528) == 96  # 16 rows: 3 splits
    assert columns_per_split(pairs=1024, width=256, block_n=32, programs=528) == 256  # 64 rows: one split
    assert columns_per_split(pairs=1, width=40, block_n=64, programs=528) == 64


def test_fake_implementation_gives_the_output_shape():
    query = torch.empty(3, 8, 5, 64, device="meta")
    key = value = torch.empty(3, 2, 300, 64, device="meta")
    mask = torch.empty(3, 1, 5, 256, device="meta")
    output = decode_attention(query, key, value, mask, 0.125)
    assert output.shape == (3, 5, 8, 64) and output.device.type == "meta"


def kernel_jobs() -> dict[str, tuple]:
    """The kernel's inputs in every test below, by name: (query, key, value, mask, scaling, columns per split)."""
    jobs = {}
    for index, case in enumerate(CASES):
        query, key, value, mask = random_case(*case, seed=1)
        width = mask.shape[-1]
        _, block_n, _ = block_sizes(query.shape[1] // key.shape[1] * query.shape[2], query.shape[3])
        for split_columns in {width, block_n, 2 * block_n}:  # one split (writes the output) and several (combined)
            jobs[f"case{index}/split{split_columns}"] = (query, key, value, mask, SCALING, split_columns)
    query, key, value, mask = random_case(3, 2, 2, 2, 16, 150, 192, False, seed=2)
    hidden = (mask[:, 0] == torch.finfo(mask.dtype).min).all(1)  # [rows, width]: columns no query of a row sees
    nan_key, nan_value = key.clone(), value.clone()
    for states in (nan_key, nan_value):
        states[:, :, :192][hidden[:, None].expand(-1, 2, -1)] = torch.nan
        states[:, :, 192:] = torch.nan  # past the width
    for split_columns in (192, 64):
        jobs[f"hidden_nan/split{split_columns}"] = (query, nan_key, nan_value, mask, SCALING, split_columns)
    jobs["hidden_nan/reference"] = (query, key, value, mask, SCALING, 192)
    query, key, value, mask = random_case(2, 2, 2, 3, 16, 40, 64, False, seed=3)
    mask[1, :, 2] = torch.finfo(mask.dtype).min  # row 1's third token sees no column
    jobs["sees_nothing"] = (query, key, value, mask, SCALING, 32)
    return jobs


INTERPRETED = """
import sys
import torch
from specbench.engine.decode_attention import launch
jobs = torch.load(sys.argv[1])
torch.save({name: launch(*arguments) for name, arguments in jobs.items()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """The jobs, and the Triton kernels' outputs for them run by Triton's interpreter on the CPU.

    In a subprocess: the interpreter is chosen when Triton is imported, which transformers may already have done here.
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton comes with CUDA builds of torch only")
    if tuple(int(part) for part in importlib.metadata.version("triton").split(".")[:2]) < (3, 9):
        pytest.skip("Triton's interpreter before 3.9 (3.6 tried) fails on loops over run-time bounds with NumPy 2.4")
    folder = tmp_path_factory.mktemp("interpreted")
    jobs = kernel_jobs()
    torch.save(jobs, folder / "jobs.pt")
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-c", INTERPRETED, str(folder / "jobs.pt"), str(folder / "outputs.pt")]
    subprocess.run(command, env=environment, check=True)
    return jobs, torch.load(folder / "outputs.pt")


def expected_output(query, key, value, mask, scaling, split_columns) -> torch.Tensor:
    width = mask.shape[-1]
    return matmul_attention(query, key[:, :, :width], value[:, :, :width], mask, scaling)


def test_triton_kernel_equals_matmul_attention(interpreted):
    jobs, outputs = interpreted
    names = [name for name in jobs if name.startswith("case")]
    assert len(names) >= 2 * len(CASES)
    for name in names:
        torch.testing.assert_close(outputs[name], expected_output(*jobs[name]), rtol=1e-5, atol=1e-5, msg=name)


def test_triton_kernel_reads_no_hidden_column(interpreted):
    """Keys and values of columns hidden from every query of a row are never read: NaNs there change nothing."""
    jobs, outputs = interpreted
    expected = expected_output(*jobs["hidden_nan/reference"])
    for split_columns in (192, 64):
        torch.testing.assert_close(outputs[f"hidden_nan/split{split_columns}"], expected)


def test_triton_kernel_gives_zeros_to_a_query_that_sees_nothing(interpreted):
    jobs, outputs = interpreted
    output, expected = outputs["sees_nothing"], expected_output(*jobs["sees_nothing"])
    assert torch.equal(output[1, 2], torch.zeros_like(output[1, 2]))
    torch.testing.assert_close(output[0], expected[0])
    torch.testing.assert_close(output[1, :2], expected[1, :2])
