"""training.sharding: fsdp - FSDP2 (`torch.distributed.fsdp.fully_shard`) over the processes accelerate started.

accelerate launches the processes, joins them (NCCL on GPUs, gloo on the CPU), autocasts and keeps the LR
scheduler and RNG states; the sharding itself is done here with `fully_shard`, the same call on GPUs and CPUs.
Why not accelerate's own FSDP plugin: accelerate 1.15 ignores it for CPU processes (MULTI_CPU stays data
parallel), so that path could not be built or tested without GPUs.

Resumable state, per process and without any gather (`state/sharded_rank<r>.safetensors`): the process's shards
of the trainable weights (`model/<name>`) and of the optimizer state (`optim/<index>/<key>`), the optimizer's
param groups and the parameter order in the metadata. Exact resume therefore needs the same process count.
Exported weight files are gathered once, tensor by tensor, onto process 0 (`gather_state_dict`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from pathlib import Path

import torch

from .cache import load_tensors, read_header, save_tensors_atomic
from .errors import UserError

SHARD_FILE = "sharded_rank{rank}.safetensors"
NUM_PROCESSES_KEY = "num_processes"


def shard_file(state_dir: Path, rank: int) -> Path:
    return Path(state_dir) / SHARD_FILE.format(rank=rank)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_transformer(accelerator, model: torch.nn.Module, cpu_offload: bool) -> torch.nn.Module:
    """Shard each transformer block, then the rest (embeddings, norms, projections) as the root unit, in place.
    The forward is autocast the way accelerate's prepare would (mixed precision), outputs in fp32."""
    from accelerate.utils import convert_outputs_to_fp32
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if accelerator.num_processes < 2:
        raise UserError(
            "training.sharding: fsdp needs several processes, this run has 1; set training.distributed: true "
            "(and training.num_processes), or training.sharding: none"
        )
    # FSDP2 warns that the model returns a view (an in-place op on it would skip the backward all-gather); the
    # training step never modifies the prediction in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    # On a CPU run everything is in CPU memory already (and FSDP2's offload needs an accelerator device).
    policy = CPUOffloadPolicy() if cpu_offload and accelerator.device.type != "cpu" else OffloadPolicy()
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    if accelerator.native_amp:
        forward = model.forward

        @functools.wraps(forward)
        def autocast_forward(*args, **kwargs):
            with accelerator.autocast():
                return forward(*args, **kwargs)

        model.forward = convert_outputs_to_fp32(autocast_forward)
    return model


@contextlib.contextmanager
def no_gradient_sync(model: torch.nn.Module):
    """Gradient accumulation: keep the micro-batch's gradients unreduced until the last one."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own part on this process (a replicated one: the whole tensor); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def gather_state_dict(model: torch.nn.Module, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """The full tensors of the model's state dict (names kept by `keep`), on the CPU of process 0; the other
    processes take part in each gather and return {}. One tensor at a time: never a second whole model."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    main = dist.get_rank() == 0
    out = {}
    for name, t in model.state_dict().items():
        if not keep(name):
            continue
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if main:
            out[name] = full.detach().cpu()
    return out


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_shards(state_dir: Path, model: torch.nn.Module, optimizer, rank: int, num_processes: int) -> Path:
    """This process's shards of the trainable weights and of the optimizer state, with no communication."""
    params = _trainable(model)
    tensors = {f"model/{n}": local_tensor(p.detach()) for n, p in params.items()}
    opt = optimizer.state_dict()
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            tensors[f"optim/{index}/{key}"] = local_tensor(value)
    meta = {
        "param_groups": json.dumps(opt["param_groups"]),
        "param_names": json.dumps(list(params)),
        NUM_PROCESSES_KEY: str(num_processes),
    }
    path = shard_file(state_dir, rank)
    save_tensors_atomic(path, tensors, meta)
    return path


def saved_process_count(state_dir: Path) -> int | None:
    """The process count a sharded state was saved with (None: not a sharded state)."""
    path = shard_file(state_dir, 0)
    if not path.is_file():
        return None
    return int(read_header(path)[1][NUM_PROCESSES_KEY])


def load_shards(state_dir: Path, model: torch.nn.Module, optimizer, rank: int) -> None:
    """Put this process's saved shards back into the sharded weights and the optimizer."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    path = shard_file(state_dir, rank)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    saved = load_tensors(path)
    params = _trainable(model)
    if json.loads(meta["param_names"]) != list(params):
        raise UserError(f"{path}: the saved weights do not fit this model; resume with the config the run started with")
    ordered = list(params.values())
    state: dict[int, dict] = {}
    with torch.no_grad():
        for key, tensor in saved.items():
            kind, _, rest = key.partition("/")
            if kind == "model":
                local_tensor(params[rest]).copy_(tensor)
                continue
            index, _, name = rest.partition("/")
            p = ordered[int(index)]
            if isinstance(p, DTensor) and tensor.shape == p.to_local().shape and name != "step":
                tensor = DTensor.from_local(tensor, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            state.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def register_state_hooks(accelerator, model: torch.nn.Module, optimizer) -> None:
    """accelerate save_state/load_state keep the scheduler and RNG states; these hooks add each process's shards
    (the model and optimizer are not given to accelerate.prepare, so it saves neither itself)."""

    def save_hook(models, weights, output_dir):
        save_shards(Path(output_dir), model, optimizer, accelerator.process_index, accelerator.num_processes)
        weights.clear()

    def load_hook(models, input_dir):
        load_shards(Path(input_dir), model, optimizer, accelerator.process_index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
