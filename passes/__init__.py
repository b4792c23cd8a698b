"""The passes (installed as pcompile.passes). Importing this package registers them all."""
from pcompile.passes import flops, layers, memory, search, shapes, sharded_data_parallel, tensor_parallel, trace  # noqa: F401
from pcompile.passes import activation_checkpoint, operator_split, sequence_parallel  # noqa: F401
from pcompile.passes import symbolic  # noqa: F401
from pcompile.passes import pipeline_split  # noqa: F401
from pcompile.passes import reshard  # noqa: F401
from pcompile.passes import loss_check  # noqa: F401
