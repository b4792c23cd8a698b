"""Mixed precision: bf16 compute with fp32 master weights (Megatron's Float16Module + its
mixed-precision optimizer; FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)).

`compile(..., mixed_precision="bf16")` lowers the rank's module (a pipeline rank: its stages) as
usual, then `MasterWeights`
  1. keeps an fp32 copy (the master) of every local parameter (its tp / ZeRO-3 shard), and
     casts the module's floating parameters and buffers to bf16 (as Megatron's module.bfloat16():
     an fp32 buffer would promote bf16 activations back to fp32);
  2. `pull()` before each forward: the (possibly stepped) masters -> the bf16 parameters;
  3. `cast_inputs()`: floating inputs to bf16 (FSDP2's cast_forward_inputs); integer ones as is;
  4. every backward (each micro-batch of a pipeline schedule, each train_step) moves the bf16
     gradient of a parameter into its fp32 master gradient as soon as autograd has accumulated
     it (a post-accumulate-grad hook: Megatron's main_grad), so gradients accumulate in fp32
     across micro-batches and train_steps - a bf16 sum keeps 8 bits, and 1 + 8 * 2**-9 stays 1.
The backend then averages the master gradients over dp IN FP32 (cast first, then all-reduce:
Megatron forces accumulate_allreduce_grads_in_fp32 for bf16) - a bf16 ring all-reduce rounds
every partial sum to 8 bits, an error that grows with dp; fp32 costs twice the bytes.
ZeRO-3 (sdp) parameters are the exception: their gradients are reduce-scattered inside the
graph (pcompile.runtime.sdp) in the gradient's dtype, bf16 (FSDP2's default reduce_dtype = param_dtype),
and become fp32 master gradients after that. Known gaps against pcompile.cost.pricing, which charges
2-byte gradients: the dp all-reduce moves 4-byte ones, and each parameter holds a 4-byte fp32
master gradient from its first backward to zero_grad() (18 bytes per parameter with Adam at
the step, not 16).
The user's optimizer is built on `CompiledModel.parameters()`, which are the masters, so it
steps (and keeps its moments) in fp32 and checkpoints save fp32; the next train_step's
`pull()` is the copy back to bf16 (done lazily so any optimizer and checkpoint.load work).
"""
from __future__ import annotations

import torch

from pcompile.errors import PcompileError

DTYPES = {None: None, "bf16": torch.bfloat16}


def compute_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The compute dtype of a `mixed_precision` option (None: everything fp32)."""
    if mixed_precision not in DTYPES:
        raise PcompileError(f"unknown mixed_precision {mixed_precision!r}",
                            f"use one of {list(DTYPES)} (None = fp32 everywhere, 'bf16' = bf16 compute "
                            "with fp32 master weights)")
    return DTYPES[mixed_precision]


class MasterWeights:
    """fp32 masters for a module whose parameters compute in `dtype`."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self._module = module
        self._names = [name for name, _ in module.named_parameters()]  # one name per tensor (tied ones once)
        self.masters = [torch.nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
                        for _, p in module.named_parameters()]
        module.to(dtype)  # tied parameters stay one tensor
        self._low = [p for _, p in module.named_parameters()]
        self._by_id = {id(low): master for low, master in zip(self._low, self.masters)}
        for low in self._low:
            if low.requires_grad:
                low.register_post_accumulate_grad_hook(self._accumulate)

    def named_parameters(self):
        return zip(self._names, self.masters)

    def parameters(self):
        return iter(self.masters)

    def master(self, tensor: torch.Tensor) -> torch.Tensor:
        """The master of one of the module's parameters; any other tensor (a buffer) as it is."""
        return self._by_id.get(id(tensor), tensor)

    def by_name(self) -> dict[str, torch.nn.Parameter]:
        """Every parameter name of the module, tied aliases included (as state_dict lists them) -> its master."""
        return {name: self.master(p) for name, p in self._module.named_parameters(remove_duplicate=False)}

    def pull(self) -> None:
        """Masters -> the module's bf16 parameters (after an optimizer step or checkpoint load)."""
        with torch.no_grad():
            for low, master in zip(self._low, self.masters):
                low.copy_(master)

    def cast_inputs(self, inputs: tuple) -> tuple:
        return tuple(x.to(self.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                     for x in inputs)

    def _accumulate(self, low: torch.Tensor) -> None:
        """Post-accumulate-grad hook of a bf16 parameter: its gradient into the master's, in fp32."""
        master = self._by_id[id(low)]
        if master.grad is None:
            master.grad = low.grad.float()
        else:
            master.grad.add_(low.grad)
        low.grad = None
