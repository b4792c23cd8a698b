"""fp32 master weights: gradients accumulate in fp32 across backwards (pipeline micro-batches,
train_steps under no_sync), never in bf16."""
import pytest
import torch

import pcompile
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



def test_a_dtype_the_capture_baked_in_is_a_pcompile_error_under_bf16():
    """HF T5's norm casts back to bf16 only behind `if self.weight.dtype in (float16, bfloat16)`,
    a Python branch export took at fp32: under bf16 a Linear meets its fp32 output. One clear
    error naming that and the fix, not torch's dtype message."""
    pytest.importorskip("transformers")
    from tests.models.zoo import t5, token_batch

    torch.manual_seed(0)
    batch = token_batch(0)
    cm = pcompile.compile(t5(), pcompile.Cluster.local(1), batch, plan=pcompile.Plan.uniform(),
                          mixed_precision="bf16")
    with pytest.raises(pcompile.PcompileError, match="captured in fp32") as info:
        cm.train_step(*batch)
    assert "mixed_precision=None" in info.value.fix
