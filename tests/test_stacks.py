"""serving.stacks: StackedLoRA adds each row's own delta, weights read once per block."""

import pytest
import torch

from adaptr.errors import InvalidInputError


def test_block_size():
    from adaptr.serving.stacks import _block_size

    assert _block_size(torch.tensor([1, 1, 2, 2, 2, 2])) == 2
    assert _block_size(torch.tensor([0, 0, 0, 1, 1, 1])) == 3
    assert _block_size(torch.tensor([1, 2, 2])) == 1
    assert _block_size(torch.tensor([3, 3, 3, 3])) == 4
    assert _block_size(torch.tensor([1, 1, 2, 1, 1])) == 1


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows, blocks",
    [([1, 1, 1], 1), ([1, 2, 0], 3), ([2, 2, 0, 0, 1, 1], 3), ([1, 1, 2, 2, 2, 2], 3)],
)
def test_stacked_lora_adds_each_rows_own_delta(out_dtype, rows, blocks):
    from adaptr.serving.stacks import BatchState, StackedLoRA

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6, bias=False)
    state = BatchState(2**30, torch.tensor(rows))
    stacked = StackedLoRA(layer, 3, state)
    weights = {
        1: (torch.randn(4, 8), torch.randn(6, 4), 0.5),
        2: (torch.randn(2, 8), torch.randn(6, 2), 2.0),
    }
    for slot, (A, B, scaling) in weights.items():
        stacked.set(slot, A, B, scaling)
    x = torch.randn(len(rows), 5, 8)
    stacked.handle.remove()  # called by hand below, on the plain layer's output
    with torch.no_grad():
        base = layer(x)
        # a bf16 output takes the out-of-place path (the stacks stay fp32)
        got = stacked._hook(layer, (x,), base.clone().to(out_dtype))
    a = next(iter(state.cache.values())).A  # the gathered A
    assert a.shape[0] == blocks or (blocks == 1 and a.dim() == 2)  # weights read once per block
    if len(rows) > 3:  # inputs whose first dimension is not the batch's rows are refused
        with pytest.raises(InvalidInputError, match="first dimension"):
            n = len(rows) + 1  # e.g. tokens flattened across the batch
            stacked._hook(layer, (x.reshape(-1, 8)[:n],), base.reshape(-1, 6)[:n].clone())
    for i, slot in enumerate(rows):
        want = base[i].clone()
        if slot:
            A, B, scaling = weights[slot]
            want += (x[i] @ A.T @ B.T) * scaling
        tol = 1e-5 if out_dtype == torch.float32 else 3e-2
        assert got.dtype == out_dtype
        assert (got[i].float() - want).abs().max() < tol * max(1.0, want.abs().max())
