"""The price of an offloaded optimizer (Plan.offload_optimizer, ZeRO-Offload): what a step pays
for keeping the fp32 masters, their gradients and the optimizer's moments in host memory, as
pcompile.runtime.precision.MasterWeights(offload=True) runs it. pcompile.cost.pricing adds it to a
layer's per-step sync and takes the states off the device."""
from __future__ import annotations


def offload_time(elements: float, p_bytes: float, devices) -> float:
    """Seconds per step of an offloaded optimizer (pcompile.runtime.precision, offload=True) for
    `elements` parameter elements held by a rank, on the slowest of `devices`: each gradient
    copied to the host in the compute dtype (p_bytes) as backward makes it, each stepped master
    copied back in it before the next forward (Device.host_bandwidth, both ways), and the CPU's
    step - memory-bound: Adam reads the fp32 master, gradient and two moments and writes the
    master and moments (28 bytes), plus the gradient's cast to fp32 (p_bytes + 4) and the
    master's to the compute dtype (4 + p_bytes) - at the device's share of host memory bandwidth
    (Device.host_step_bandwidth). Not overlapped: the step runs after backward, its copies between
    the optimizer step and the next forward (the gradients' copies during backward are charged
    whole too: they are synchronous in the runtime)."""
    if elements <= 0:
        return 0.0
    copies = 2 * elements * p_bytes / min(d.host_link for d in devices)
    step = elements * (28 + 2 * (p_bytes + 4)) / min(d.host_step for d in devices)
    return copies + step
