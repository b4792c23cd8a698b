"""The cost model: what a layer does, read from the annotated IR (`layer_work`), its time and
memory under each strategy on a cluster (`pricing`; its tp / sp collectives: `tp_comm`), the
search's cost tables built from them (`stage_costs`), one price for a whole plan through those
tables and the search's objective (`plan_price`), the experts of a mixture under expert
parallelism (`moe`), an offloaded optimizer's per-step cost (`offload`), and the profiler that
measures the machine at hand (`profile`).

Contract: reads the IR and the sharding rules, writes nothing to the IR; produces
pcompile.search.costtable.CostTable and pcompile.plan.Estimate values.
"""
