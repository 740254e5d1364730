"""Sharding a student too large for one device: FSDP2 (``torch.distributed.fsdp.fully_shard``) under torchrun.

``fit`` with ``strategy="fsdp"`` trains a sharded copy of the model (:func:`shard`): each transformer block is
one FSDP unit, the rest of the model the root's; each rank holds 1/N of every weight, gradient and optimizer
moment, and a block's whole weights only while its forward or backward runs. The model ``fit`` was given stays
whole on the CPU: after every epoch rank 0 gathers the trained weights into it (:func:`gather_weights`), and
the optimizer state into its unsharded optimizer when the run is saved (:func:`gather_optimizer`), so the run
folder is the one DDP or one process writes (read by evaluate, export, generate) and resumes under any strategy.

A block is a module whose class a model names in ``_no_split_modules`` (Hugging Face's convention, which the
built-in ``gpt:`` transformer follows); a model that names none is one unit, its root.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .distributed import Workers

_FULL_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: its modules of the classes it names in ``_no_split_modules``."""
    names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    return [module for module in model.modules() if type(module).__name__ in names]


def shard(model: nn.Module, optimizer: torch.optim.Optimizer,
          make_optimizer: Callable[[Any], torch.optim.Optimizer],
          workers: Workers) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A sharded copy of ``model`` on ``workers.device`` and its optimizer (made by ``make_optimizer``), holding
    ``optimizer``'s state (fresh, or resumed). ``model`` and ``optimizer`` are whole on every rank (rank 0's)."""
    net = copy.deepcopy(model)  # the caller's model stays whole: evaluated, saved and returned as ever
    mesh = init_device_mesh(workers.device.type, (workers.world_size,))
    for block in blocks(net):
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)  # moves this rank's shards to the mesh's device
    net_optimizer = make_optimizer(net.parameters())
    names = _parameter_names(model, optimizer)
    state = {names[i]: value for i, value in optimizer.state_dict()["state"].items()}
    if any(state.values()):  # resumed moments, cut into this rank's shards
        set_optimizer_state_dict(net, net_optimizer, {"state": state, "param_groups": _groups(net, net_optimizer)},
                                 options=StateDictOptions(full_state_dict=True))
    optimizer.state.clear()  # the moments live in the shards now; rank 0 gathers them back to save them
    return net, net_optimizer


def gather_weights(net: nn.Module, model: nn.Module, workers: Workers) -> None:
    """``net``'s trained weights, whole, into ``model`` on rank 0 (every rank calls it: a collective)."""
    state = get_model_state_dict(net, options=_FULL_ON_MAIN)
    if workers.is_main:
        model.load_state_dict(state)


def gather_optimizer(net: nn.Module, net_optimizer: torch.optim.Optimizer, model: nn.Module,
                     optimizer: torch.optim.Optimizer, workers: Workers) -> None:
    """``net_optimizer``'s state, whole, into ``model``'s ``optimizer`` on rank 0 (a collective)."""
    whole = get_optimizer_state_dict(net, net_optimizer, options=_FULL_ON_MAIN)  # empty on the other ranks
    if workers.is_main:
        index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
        optimizer.load_state_dict({"state": {index[name]: value for name, value in whole["state"].items()},
                                   "param_groups": optimizer.state_dict()["param_groups"]})


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of ``optimizer``'s parameters, in the order its state dict numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """``optimizer``'s own parameter groups, their parameters by name (the form FSDP's state-dict functions read).
    Only the state crosses between the whole and the sharded optimizer: each keeps its own settings (the whole
    one's fused SGD has no kernel for sharded tensors)."""
    names = _parameter_names(model, optimizer)
    return [{**group, "params": [names[i] for i in group["params"]]}
            for group in optimizer.state_dict()["param_groups"]]
