"""Weights for a model that lives on the meta device, filled on each rank for its own pieces only.

A model built under `torch.device("meta")` compiles (the analyses run on fake tensors) and the
backend allocates only what the rank holds (its tp shards, ZeRO-3 chunks, pipeline stages) with
`allocate`. Two ways to give those pieces values, both called on every rank:

- `init_weights(...)`: deterministic and plan-independent. Module by module, the module's own
  initialisation rules (its `reset_parameters()`, then the `_init_weights(module)` of the
  nearest ancestor having one: Hugging Face's convention, the built-in models') fill full-size CPU tensors of that
  module's own parameters and buffers, drawing from a generator seeded by (seed, module path);
  each rank copies its slice of them. At most one module's tensors are whole at a time, never
  the model, and the values depend on the seed and the module's path only: the full state is
  the same under every plan and world size, and `init_model_weights(model, seed)` gives it on
  one device. (A tied weight takes the values of the first module that owns it.)
- `load_weights(...)`: safetensors (one file, or a directory with model.safetensors.index.json)
  read with positioned reads (pcompile.runtime.safetensors_slices), so each rank reads only
  the rows / columns of its pieces and holds no more than a bounded slab beyond them. Names are
  matched through the capture: the model's own name, its tied aliases, and the name without
  leading wrapper components ("model.model.layers.0..." finds "model.layers.0..." or
  "layers.0...").
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os

import torch

from pcompile.errors import PcompileError
from pcompile.ir.params import aliases
from pcompile.ir.placement import Shard
from pcompile.runtime.safetensors_slices import SafetensorsFile

INDEX = "model.safetensors.index.json"


def on_meta(module: torch.nn.Module) -> bool:
    """Whether `module` holds tensors without values (built on the meta device)."""
    return any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def module_seed(seed: int, path: str) -> int:
    """The generator seed of the module at `path` (stable across processes and Python runs)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "little") & (2**63 - 1)


def _rules(root: torch.nn.Module) -> dict[str, list]:
    """Module path -> its initialisation rules, in the order a constructor applies them: the
    module's own `reset_parameters()`, then the `_init_weights(module)` of its nearest ancestor
    that has one (Hugging Face's PreTrainedModel, the built-in models), which may override."""
    rules, nearest = {}, {}
    for path, module in root.named_modules():
        init = getattr(module, "_init_weights", None)
        parent = path.rpartition(".")[0] if path else None
        nearest[path] = init if callable(init) else nearest.get(parent)
        own = [module.reset_parameters] if callable(getattr(module, "reset_parameters", None)) else []
        rules[path] = own + ([functools.partial(nearest[path], module)] if nearest[path] is not None else [])
    return rules


def _unset(t: torch.Tensor) -> torch.Tensor:
    """A marker value no rule writes by chance: NaN, or an integer type's largest value."""
    if t.dtype == torch.bool:
        return t.fill_(False)
    return t.fill_(float("nan") if t.is_floating_point() or t.is_complex() else torch.iinfo(t.dtype).max)


def _never_set(t: torch.Tensor) -> bool:
    if t.dtype == torch.bool or t.numel() == 0:
        return False
    if t.is_floating_point() or t.is_complex():
        return bool(torch.isnan(t).all())
    return bool((t == torch.iinfo(t.dtype).max).all())


def module_values(root: torch.nn.Module, seed: int, wanted: set[int] | None = None):
    """(full name, tensor id in `root`, full CPU value) of every parameter and buffer of `root`,
    module by module (one module's own tensors materialised at a time), drawn as the module
    initialises itself (`_rules`) from a generator seeded by (seed, module path). `wanted`: ids
    of the tensors to produce (None: all); modules holding none of them are skipped. A tensor no
    rule sets is refused (its values would be whatever the memory held)."""
    rules, done = _rules(root), set()
    for path, module in root.named_modules():
        own = [(kind, name, t) for kind, store in (("p", module._parameters), ("b", module._buffers))
               for name, t in store.items() if t is not None]
        todo = [(kind, name, t) for kind, name, t in own if id(t) not in done and (wanted is None or id(t) in wanted)]
        if not todo:
            continue
        originals = {name: t for _, name, t in own}
        try:
            for kind, name, t in own:  # the module's tensors, full size, on the CPU
                value = _unset(torch.empty(t.shape, dtype=t.dtype, device="cpu"))
                if kind == "p":
                    module._parameters[name] = torch.nn.Parameter(value, requires_grad=t.requires_grad)
                else:
                    module._buffers[name] = value
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(module_seed(seed, path))
                for rule in rules[path]:
                    rule()
            for kind, name, t in todo:
                store = module._parameters if kind == "p" else module._buffers
                full = f"{path}.{name}" if path else name
                if _never_set(store[name]):
                    raise PcompileError(
                        f"no initialisation rule sets {full!r} of the meta-built model ({type(module).__name__} has "
                        "no reset_parameters() that sets it, and no _init_weights(module) of the model does)",
                        f"give {type(module).__name__} a reset_parameters() (or the model an _init_weights(module)) "
                        "that sets it, or load its values: cm.load_weights(path) from a checkpoint holding it")
                done.add(id(t))
                yield full, id(t), store[name].detach()
        finally:
            for kind, name, t in own:
                (module._parameters if kind == "p" else module._buffers)[name] = originals[name]


def allocate(modules: list[torch.nn.Module], device: torch.device) -> dict[int, torch.Tensor]:
    """`to_empty` for several modules that keeps shared tensors shared: one uninitialised tensor on
    `device` per distinct parameter / buffer (`Module.to_empty` replaces a tied weight once per
    owner, untying it). Returns old tensor id -> its replacement."""
    new: dict[int, torch.Tensor] = {}
    for module in modules:
        for owner in module.modules():
            for store, is_param in ((owner._parameters, True), (owner._buffers, False)):
                for name, t in store.items():
                    if t is None:
                        continue
                    if id(t) not in new:
                        empty = torch.empty_like(t, device=device)
                        new[id(t)] = torch.nn.Parameter(empty, requires_grad=t.requires_grad) if is_param else empty
                    store[name] = new[id(t)]
    return new


def local_piece(full: torch.Tensor, shards: list[tuple[Shard, int]]) -> torch.Tensor:
    """This rank's piece of `full`: cut by each (shard, coordinate) in turn."""
    for shard, coordinate in shards:
        full = shard.chunk(full, coordinate)
    return full


def fill_from_init(template: torch.nn.Module, targets: dict[str, torch.Tensor], cuts, seed: int) -> None:
    """Give every tensor of `targets` (full name -> this rank's tensor; aliases may share one) its
    slice of the plan-independent initial values of `template` (the model, on meta or not).
    `cuts(name)`: the (shard, coordinate) pairs that cut the tensor on this rank."""
    by_id = {}
    for name, target in targets.items():
        source = _template_tensor(template, name)
        by_id.setdefault(id(source), []).append((name, target))
    with torch.no_grad():
        for _, tensor_id, value in module_values(template, seed, set(by_id)):
            for name, target in by_id[tensor_id]:
                target.copy_(local_piece(value, cuts(name)).to(target.dtype))


def _template_tensor(template: torch.nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    module = template.get_submodule(path) if path else template
    tensor = module._parameters.get(attr)
    if tensor is None:
        tensor = module._buffers.get(attr)
    if tensor is None:
        raise PcompileError(f"internal error: the model has no tensor {name!r}",
                            "this is a pcompile bug; please report it")
    return tensor


def init_model_weights(model: torch.nn.Module, seed: int = 0, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The values compiled models get from `cm.init_weights(seed)`, on one device: a model on the
    meta device is allocated on `device` first. Returns the model."""
    template = copy.deepcopy(model) if on_meta(model) else model  # meta: a free copy keeps the shapes
    if template is not model:
        allocate([model], torch.device(device))
    fill_from_init(template, model_tensors(model), lambda name: [], seed)
    return model


def model_tensors(module: torch.nn.Module, persistent_only: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` under every name it has (to fill under no_grad)."""
    out = dict(module.named_parameters(remove_duplicate=False))
    for path, owner in module.named_modules(remove_duplicate=False):
        for name, t in owner._buffers.items():
            if t is not None and not (persistent_only and name in owner._non_persistent_buffers_set):
                out[f"{path}.{name}" if path else name] = t
    return out


# -- safetensors -----------------------------------------------------------------------------
def checkpoint_files(path: str) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it, for a file or a sharded directory."""
    if os.path.isfile(path):
        with SafetensorsFile(path) as f:
            return dict.fromkeys(f.keys(), path)
    index = os.path.join(path, INDEX)
    if os.path.isdir(path) and os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return checkpoint_files(single)
    raise PcompileError(f"{path!r} is not a safetensors file nor a directory with {INDEX} or model.safetensors",
                        "pass a .safetensors file, a Hugging Face model directory, or a pcompile checkpoint")


def checkpoint_name(name: str, names: list[str], available) -> str | None:
    """The checkpoint key for parameter `name` (its `names` include tied aliases): the name itself,
    or without leading wrapper components."""
    for candidate in names:
        parts = candidate.split(".")
        for start in range(len(parts)):
            key = ".".join(parts[start:])
            if key in available:
                return key
    return None


def _slices(shape, shards: list[tuple[Shard, int]]) -> list[list[tuple[int, int]]] | None:
    """Per dim, the [start, stop) ranges of the piece the shards cut (in order), or None when a
    block-wise cut is followed by another along the same dim (read the tp piece, then cut)."""
    ranges = [[(0, n)] for n in shape]
    for shard, coordinate in shards:
        current = ranges[shard.dim]
        if len(current) > 1:
            return None
        start, stop = current[0]
        length = stop - start
        if shard.blocks > 1:
            block = length // shard.blocks
            piece = block // shard.size
            ranges[shard.dim] = [(start + b * block + coordinate * piece, start + b * block + (coordinate + 1) * piece)
                                 for b in range(shard.blocks)]
        else:
            piece = length // shard.size
            ranges[shard.dim] = [(start + coordinate * piece, start + (coordinate + 1) * piece)]
    return ranges


def read_piece(handle: SafetensorsFile, key: str, shards: list[tuple[Shard, int]]) -> torch.Tensor:
    """This rank's piece of tensor `key` of an open safetensors file, reading only its slices."""
    shape = handle.shape(key)
    ranges = _slices(shape, shards)
    if ranges is None:  # a block-wise cut cut again along its dim: the tensor, then the pieces
        return local_piece(handle.read(key, [[(0, n)] for n in shape]), shards)
    return handle.read(key, ranges)


def fill_from_safetensors(path: str, model: torch.nn.Module, targets: dict[str, torch.Tensor], cuts,
                          strict: bool = True) -> None:
    """Give every tensor of `targets` its piece of the checkpoint at `path` (see the module
    docstring); `model`: the model (for its parameters' aliases). `strict`: every target must be
    in the checkpoint (else those missing keep their values)."""
    files = checkpoint_files(path)
    names = aliases(model)
    missing, done = [], set()
    with contextlib.ExitStack() as stack, torch.no_grad():
        handles = {}
        for name, target in targets.items():
            if id(target) in done:
                continue
            key = checkpoint_name(name, names.get(name, [name]), files)
            if key is None:
                missing.append(name)
                continue
            file = files[key]
            if file not in handles:
                handles[file] = stack.enter_context(SafetensorsFile(file))
            piece = read_piece(handles[file], key, cuts(name))
            if tuple(piece.shape) != tuple(target.shape):
                raise PcompileError(f"checkpoint tensor {key!r} gives this rank a {list(piece.shape)} piece for "
                                    f"{name!r}, which holds {list(target.shape)}",
                                    "load a checkpoint of this model's configuration")
            target.copy_(piece.to(target.dtype))
            done.add(id(target))
    if missing and strict:
        raise PcompileError(f"{path} holds no tensor for {len(missing)} of the model's parameters and buffers, e.g. "
                            f"{missing[:3]}", "load the checkpoint of this model (names are matched with and without "
                            "wrapper prefixes), or init_weights(seed) first and load_weights(path, strict=False)")
