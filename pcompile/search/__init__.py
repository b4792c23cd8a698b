"""The plan search: per-layer strategies, pipeline stages, micro-batches and schedule under each
stage's memory, from cost tables (`costtable.CostTable`: the contract with the cost model).

Contract: numpy and plan data only (pcompile.plan, pcompile.errors) - no torch, no IR - so the
search can be tested on random tables against an exhaustive oracle. `engine.search(problem)`
is the entry point; `space` holds the space, the pruning rules and the objective every
search minimises (`evaluate`), `dp` the knapsack / partition DPs, `baselines` the plans it is
compared with, `schedules` the pipeline schedules' op orders and memory walk, `result` what
it returns and how it explains itself.
"""
