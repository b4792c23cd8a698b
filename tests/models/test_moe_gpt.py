"""The built-in MoE GPT (pcompile.models.MoEGPT): its dense-written mixture is the dropless
top-k mixture (each token the gate-weighted sum of its top-k experts only), the aux loss is
the Switch / Mixtral balancing loss, and captured its layers are the transformer blocks (not
the experts inside each block, though there are more experts than blocks)."""
import torch
import torch.nn.functional as F

import pcompile
from pcompile.models import MoE, MoEGPT, MoEGPTConfig, moe_gpt_inputs

CFG = MoEGPTConfig(num_layers=2, num_experts=4, top_k=2, hidden=16, num_heads=2, seq_len=8, vocab_size=32)


def _sparse(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the renormalised gates of its top-k experts times those experts' outputs."""
    flat = x.reshape(-1, x.shape[-1])
    probs = F.softmax(moe.router(flat), dim=-1)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        gates, chosen = torch.topk(probs[t], moe.top_k)
        gates = gates / gates.sum()
        for g, e in zip(gates, chosen.tolist()):
            out[t] += g * moe.experts[e](flat[t])
    return out.view_as(x)


def test_dense_mixture_is_the_sparse_top_k_mixture():
    torch.manual_seed(0)
    moe = MoE(CFG)
    x = torch.randn(2, 8, CFG.hidden)
    dense, aux = moe(x)
    torch.testing.assert_close(dense, _sparse(moe, x), atol=1e-6, rtol=1e-5)
    probs = F.softmax(moe.router(x), dim=-1)
    share = F.one_hot(torch.topk(probs, 2).indices, 4).float().sum(dim=(0, 1, 2)) / (2 * 8 * 2)
    torch.testing.assert_close(aux, 4 * (share * probs.mean(dim=(0, 1))).sum())


def test_aux_loss_coefficient():
    torch.manual_seed(0)
    plain = MoEGPT(CFG)
    with_aux = MoEGPT(MoEGPTConfig(**{**CFG.__dict__, "aux_loss_coef": 0.5}))
    with_aux.load_state_dict(plain.state_dict())
    ids, targets = moe_gpt_inputs(CFG, 2)
    assert with_aux(ids, targets) > plain(ids, targets)  # the balancing loss is >= 1 per block


def test_layers_are_blocks_not_experts():
    torch.manual_seed(0)
    model = MoEGPT(CFG)
    ir = pcompile.compile(model, pcompile.Cluster.local(4), moe_gpt_inputs(CFG, 4), plan=pcompile.Plan.uniform(dp=4),
                          stop_after="layers")
    assert ir.layers == ["pre", "blocks.0", "blocks.1", "post"]
