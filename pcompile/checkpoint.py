"""Distributed checkpoints with torch.distributed.checkpoint (DCP), plan-independent.

Every tensor is saved under the ORIGINAL model's parameter name ("model.<name>",
"optim.<name>.<state>"); a parameter split by the plan is saved as a DTensor with a Shard
placement on each mesh axis that cut it (tp, then dp for ZeRO-3 layers: a 2-D (tp, dp) mesh
when both did, pipeline stages included), so DCP records where each chunk sits in the full
tensor. Loading
under another plan (other dp/tp/pp, other world size) or into the serial model
(`load_full`) asks DCP for the chunks that plan needs; DCP reshards.

Several nodes: every rank writes its own chunks into the directory and reads others' when
loading under another plan, so the directory must be one shared filesystem (NFS, Lustre,
a mounted bucket). `save` checks that every rank sees the same directory (a file rank 0
writes, read by all) and `load` that every rank sees the same checkpoint (identical copies
on each node will do); both refuse naming the ranks and hosts that do not, before any rank
writes or reads a chunk.

Atomicity: a checkpoint is written to `DIR/step-N.tmp`, renamed to `DIR/step-N` once every
rank has finished, and only then does `DIR/latest` (replaced atomically with os.replace) point
to it. A crash at any moment leaves `latest` naming a complete checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from pcompile.errors import PcompileError
from pcompile.ir.params import canonical
from pcompile.mesh import rank_grid

LATEST = "latest"
META = "pcompile.json"


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _ranks_failing(check) -> list[tuple[int, str]]:
    """Collective: (rank, host) of every rank where `check()` is False."""
    import socket

    ok = check()
    if not _distributed():
        return [] if ok else [(0, socket.gethostname())]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (ok, socket.gethostname()))
    return [(rank, host) for rank, (fine, host) in enumerate(everyone) if not fine]


def _check_shared(directory: str) -> None:
    """Collective: refuse a directory that is not the same on every rank (see the docstring)."""
    if not _distributed():
        return
    name = [f".pcompile-shared-{os.getpid()}-{os.urandom(4).hex()}"]
    dist.broadcast_object_list(name, src=0)  # rank 0's token name
    token = os.path.join(directory, name[0])
    if _rank() == 0:
        os.makedirs(directory, exist_ok=True)
        with open(token, "w") as f:
            f.write(name[0])
    _barrier()

    def sees() -> bool:  # rank 0's token, in this rank's view of the directory
        try:
            with open(token) as f:
                return f.read() == name[0]
        except OSError:
            return False
    failing = _ranks_failing(sees)
    if _rank() == 0:
        os.remove(token)
    if failing:
        raise PcompileError(f"checkpoint directory {directory!r} is not shared by every rank: rank(s) "
                            f"{', '.join(f'{r} on {h}' for r, h in failing)} do not see rank 0's files",
                            "save to a filesystem every node mounts at the same path (NFS, Lustre, a shared "
                            "bucket mount)")


def _sdp_shardings(cm) -> dict:
    """How the plan shards each ZeRO-3 parameter over dp (every name of it), after tp."""
    pipeline = getattr(cm, "_pipeline", None)
    return getattr(pipeline if pipeline is not None else cm, "sdp_shardings", {})


def _mesh(cm, axes: tuple[str, ...], device_type: str) -> DeviceMesh:
    """This rank's mesh over `axes` ("tp" and/or "dp", in that order) from the plan's groups, laid
    out as pcompile.mesh numbers ranks (pp outermost, tp innermost)."""
    if len(axes) == 1:
        return DeviceMesh.from_group(cm.groups[axes[0]], device_type)
    p = cm.coords.get("pp", 0)
    tp, dp = (dist.get_world_size(cm.groups[axis]) for axis in axes)  # a layer's own grouping (passes/reshard.py)
    ranks = torch.tensor(rank_grid(p + 1, dp, tp)[p], dtype=torch.int).T  # [tp, dp] of stage p
    return DeviceMesh.from_group([cm.groups[axis] for axis in axes], device_type, mesh=ranks, mesh_dim_names=axes)


def _placed(cm, name: str, local: torch.Tensor, meshes: dict):
    """The local tensor as a DTensor when the plan splits it, else as is (replicated). The
    placements follow the cut: tp's chunk first, then dp's chunk of it (DTensor shards along
    its mesh dims in order, so a dim cut by both is described exactly)."""
    cuts = [s for s in (cm.ir.param_shardings.get(name), _sdp_shardings(cm).get(name))
            if s is not None and s.size > 1]
    if not cuts or not _distributed():
        return local
    # block-wise (fused qkv), or batched expert weights re-stacked by a rebalancing (a rank's rows
    # are any set of experts, backends/expert_groups.py): no DTensor placement says so; saved whole
    if any(c.blocks > 1 for c in cuts) or name in _restacked(cm):
        return _full(cm, name, local)
    axes = tuple(c.axis for c in cuts)
    if axes not in meshes:
        meshes[axes] = _mesh(cm, axes, local.device.type)
    return DTensor.from_local(local, meshes[axes], [Shard(c.dim) for c in cuts], run_check=False)


def _restacked(cm) -> set[str]:
    """Batched expert weights whose rows follow a rebalanced placement, not their "ep" Shard."""
    experts = getattr(cm, "experts", None)
    return set() if experts is None else experts.restacked


def _remote_experts(cm) -> set[str]:
    """Expert parameters this rank holds no values of (expert parallelism keeps each expert on
    its holders only, backends/expert_groups.py): left out of what it saves and loads. Each
    holder of an expert writes it under its own name (holders of the same expert - dp replicas,
    FlexMoE replicas - write equal values, which DCP's planner saves once); a batched expert
    weight is an "ep"-sharded DTensor like a tp shard, and so is an expert's tp slice under
    expert tensor parallelism (a "tp"-sharded one)."""
    experts = getattr(cm, "experts", None)
    return set() if experts is None else experts.names - experts.held


def _state(cm, optimizer, optim_keys: dict[str, list[str]] | None = None) -> dict:
    state = {}
    meshes: dict = {}
    remote = _remote_experts(cm)
    for name, p in cm.named_parameters():
        if name in remote:
            continue
        state[f"model.{name}"] = _placed(cm, name, p.detach(), meshes)
        if optimizer is None:
            continue
        slots = optimizer.state.get(p, {})
        if not slots and optim_keys:  # fresh optimizer: make room for the saved states
            for key in optim_keys.get(name, []):
                slots[key] = torch.zeros((), dtype=torch.float32) if key == "step" else torch.zeros_like(p)
            optimizer.state[p] = slots
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                state[f"optim.{name}.{key}"] = _placed(cm, name, value, meshes) if value.shape == p.shape else value
    for name, b in _buffers(cm):
        state[f"buffer.{name}"] = b
    return state


def _buffers(cm):
    """This rank's buffers under their original names (a pipeline rank holds its stages' only)."""
    pipeline = getattr(cm, "_pipeline", None)
    if pipeline is None:
        return list(cm.gm.named_buffers())
    return [item for module in pipeline.modules for item in module.named_buffers()]


def _full(cm, name: str, local: torch.Tensor) -> torch.Tensor:
    pipeline = getattr(cm, "_pipeline", None)
    return (cm if pipeline is None else pipeline)._full(name, local)


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Tied parameters: every extra name -> the name named_parameters() keeps."""
    return {name: first for name, first in canonical(model).items() if name != first}


def save(cm, directory: str, optimizer: torch.optim.Optimizer | None = None, step: int = 0) -> str:
    """Collective: save parameters (and optimizer states) as the plan holds them. Returns the path."""
    final = os.path.join(directory, f"step-{step:08d}")
    tmp = final + ".tmp"
    _check_shared(directory)
    if _rank() == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    dcp.save(_state(cm, optimizer), checkpoint_id=tmp, no_dist=not _distributed())
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"step": step, "plan": cm.plan.to_dict(), "aliases": _aliases(cm._model)}, f, sort_keys=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = os.path.join(directory, LATEST + ".tmp")
        with open(pointer, "w") as f:
            f.write(os.path.basename(final))
        os.replace(pointer, os.path.join(directory, LATEST))
    _barrier()
    return final


def resolve(path: str) -> str:
    """A checkpoint directory, or a run directory whose `latest` names one."""
    if os.path.exists(os.path.join(path, META)):
        return path
    pointer = os.path.join(path, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as f:
            return os.path.join(path, f.read().strip())
    raise PcompileError(f"no complete checkpoint at {path!r} (no {META} and no {LATEST} pointer)",
                        "pass the directory given to cm.save(), or a step-N directory inside it")


def _meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def _local(cm, name: str, value, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a loaded value: a DTensor's shard, or a whole block-wise split one's chunks."""
    if isinstance(value, DTensor):
        return value.to_local()
    if name in _restacked(cm) and value.shape != like.shape:  # loaded whole (_placed): this rank's experts' rows
        return cm.experts.local_rows(name, value)
    for cut in (cm.ir.param_shardings.get(name), _sdp_shardings(cm).get(name)):
        if value.shape != like.shape and cut is not None and cut.size > 1:
            value = cut.chunk(value, cm.coords[cut.axis])
    return value


def load(cm, path: str, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Collective: load a checkpoint saved under any plan into this compiled model. Returns the step."""
    missing_on = _ranks_failing(lambda: os.path.exists(os.path.join(path, META))
                                or os.path.exists(os.path.join(path, LATEST)))
    if missing_on and len(missing_on) < (dist.get_world_size() if _distributed() else 1):
        raise PcompileError(f"checkpoint {path!r} is missing on rank(s) "
                            f"{', '.join(f'{r} on {h}' for r, h in missing_on)}",
                            "load from a filesystem every node mounts at the same path (NFS, Lustre)")
    path = resolve(path)
    if _distributed():  # copies on each node must be the same checkpoint
        with open(os.path.join(path, META), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise PcompileError(f"checkpoint {path!r} differs between ranks ({path}/{META} is not the same file)",
                                "load from a filesystem every node mounts at the same path, or copy the same "
                                "checkpoint to every node")
    keys = FileSystemReader(path).read_metadata().state_dict_metadata.keys()
    optim_keys: dict[str, list[str]] = {}
    for key in keys:
        if key.startswith("optim."):
            name, _, slot = key[len("optim."):].rpartition(".")
            optim_keys.setdefault(name, []).append(slot)
    state = _state(cm, optimizer, optim_keys)
    missing = [k for k in state if k not in keys and not k.startswith("optim.")]
    if missing:
        raise PcompileError(f"checkpoint {path!r} lacks {missing[:3]}{'...' if len(missing) > 3 else ''}",
                            "load a checkpoint saved from the same model architecture")
    wanted = {k: v for k, v in state.items() if k in keys}
    dcp.load(wanted, checkpoint_id=path, no_dist=not _distributed())
    remote = _remote_experts(cm)
    with torch.no_grad():
        for name, p in cm.named_parameters():
            if name in remote:
                continue
            value = wanted[f"model.{name}"]
            p.copy_(_local(cm, name, value, p))
            for slot, target in (optimizer.state.get(p, {}).items() if optimizer else ()):
                loaded = wanted.get(f"optim.{name}.{slot}")
                if loaded is not None and isinstance(target, torch.Tensor):
                    target.copy_(_local(cm, name, loaded, target))
    _barrier()
    return _meta(path)["step"]


def load_full(path: str, with_optimizer: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint as a plain full state_dict in the original model's names (no process group)."""
    path = resolve(path)
    metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    state = {}
    for key, item in metadata.items():
        if key.startswith("optim.") and not with_optimizer:
            continue
        if hasattr(item, "size"):
            state[key] = torch.empty(item.size, dtype=item.properties.dtype)
    dcp.load(state, checkpoint_id=path, no_dist=True)
    out = {}
    for key, value in state.items():
        kind, _, name = key.partition(".")
        out[name if kind in ("model", "buffer") else key] = value
    for alias, name in _meta(path)["aliases"].items():
        out[alias] = out[name]
    return out


def full_optimizer_state(cm, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Collective: optimizer states as full tensors, keyed "optim.<param name>.<state>" as saved.
    Under pipelining a rank returns the states of its own stages' parameters."""
    out = {}
    remote = _remote_experts(cm)
    # a remote expert's states come from its holder (a collective every rank joins): the slots
    # of a held expert stand in for its missing ones - Adam keeps one step count for all
    held = [optimizer.state[p] for name, p in cm.named_parameters() if name in getattr(cm.experts, "names", ())
            and name not in remote and p in optimizer.state]
    for name, p in cm.named_parameters():
        slots = optimizer.state.get(p, {})
        if name in remote and held:
            slots = {slot: value.new_empty(0) if value.shape != () else value for slot, value in held[0].items()
                     if isinstance(value, torch.Tensor)}
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                full = _full(cm, name, value) if value.shape == p.shape else value.detach().clone()
                out[f"optim.{name}.{slot}"] = full.cpu()
    return out
