"""fp32 master weights: gradients accumulate in fp32 across backwards (pipeline micro-batches,
train_steps under no_sync), never in bf16."""
import torch

from pcompile.runtime.precision import MasterWeights


def test_gradients_of_several_backwards_accumulate_in_fp32():
    layer = torch.nn.Linear(1, 1, bias=False)
    masters = MasterWeights(layer, torch.bfloat16)
    # d(w x)/dw = x: one large gradient, then eight that a bf16 sum rounds away (1 + 2**-9 == 1)
    for x in [1.0] + [2.0 ** -9] * 8:
        masters.pull()
        (layer(torch.tensor([[x]], dtype=torch.bfloat16)).sum()).backward()
    (master,) = masters.parameters()
    assert master.grad.dtype == torch.float32
    assert master.grad.item() == 1.0 + 8 * 2.0 ** -9  # a bf16 accumulation gives 1.0
    assert layer.weight.grad is None  # the bf16 gradient is freed once moved

