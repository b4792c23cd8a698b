"""Sharding rules: what can be split how, read from the IR without changing it. Tensor
parallelism's op kinds (`tp_ops`), its propagation from column-parallel Linears to a Megatron
pairing (`tp_rules`), fused projections (`tp_fused`), vocab parallelism (`tp_vocab`), sequence
parallelism's token-wise regions (`sp_rules`), and how a loss reduces over the batch
(`loss_terms`).

Contract: pure functions of the IR; the search asks them before any rewrite, the rewrite
passes to carry the plan out, the cost model to price it - one answer for all three.
"""
