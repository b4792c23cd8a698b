"""The run-time ops rewritten graphs call (fx `call_function` targets) and what the backends
do with parameters at run time: tensor / sequence parallel collectives (`collectives`),
ZeRO-3 gathers (`sdp`), vocab-parallel embedding and cross-entropy (`vocab_parallel`), batch
regrouping between layer groupings (`batch_regroup`), checkpoint regions (`checkpointing`),
bf16 master weights (`precision`), taking and gathering parameter shards (`shards`), the
data-parallel gradient buckets (`buckets`), and the registry of every op (`ops`).

Contract: each op declares itself in `ops` (a collective names its axis argument); passes and
backends ask the registry, never a module name. Imports the IR's data types only.
"""
