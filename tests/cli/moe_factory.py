"""A MoE GPT whose routers send every token to experts 0 and 1 (4 experts, top-2), for
`pcompile run tests/cli/moe_factory.py:moe --plan ep.json --rebalance-every N`."""
import torch

from pcompile.models import MoEGPT, MoEGPTConfig, moe_gpt_inputs

CFG = MoEGPTConfig(num_layers=2, num_experts=4, top_k=2, hidden=16, num_heads=2, seq_len=8, vocab_size=32)


def moe(batch: int = 8):
    torch.manual_seed(0)
    model = MoEGPT(CFG)
    for block in model.blocks:  # the router with a bias towards experts 0 and 1
        old, block.moe.router = block.moe.router, torch.nn.Linear(CFG.hidden, CFG.num_experts)
        with torch.no_grad():
            block.moe.router.weight.copy_(old.weight)
            block.moe.router.bias.copy_(torch.tensor([20.0, 20.0, -20.0, -20.0]))
    return model, moe_gpt_inputs(CFG, batch)
