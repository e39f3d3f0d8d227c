"""The parallel layout of a run: its flags (`ParallelConfig`) and the `DeviceMesh` they make.

World = pp × dp processes. Expert parallelism does not add processes: it splits the dp ranks
into groups of `ep` that share their routed experts (each rank keeps E/ep of them and
exchanges tokens with the others by all-to-all), as DeepSeek-V3 (EP64 across the DP ranks of
8 nodes) and torchtitan do. So the mesh has three dimensions, the innermost varying fastest
(EP neighbours on the same host where possible):

    pp    pipeline stages (torch.distributed.pipelining)
    edp   dp / ep: the replicas of one expert shard (FSDP of the experts runs over it)
    ep    expert parallel group (all-to-all)
    dp    = edp × ep flattened: FSDP / replication of every other parameter, and the data split

Every rank of a dp group reads its own rows of the global batch; the ranks of a pp group read
the same rows (the first stage needs the tokens, the last the labels).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

SCHEDULES = ("1f1b", "dualpipev")
PARAM_DTYPES = (None, "bf16")


class ParallelError(ValueError):
    """A parallel layout that cannot run; the message says which flag to change."""


@dataclass
class ParallelConfig:
    dp: int = 1
    ep: int = 1
    pp: int = 1
    schedule: str = "1f1b"          # pipeline schedule when pp > 1
    microbatches: int = 0           # pipeline micro-batches per step; 0: 2 per stage
    fsdp: bool = True               # shard non-expert parameters over dp (else replicate them)
    param_dtype: str | None = None  # FSDP's compute copy: the parameters' own dtype, or bf16
    cpu_offload: bool = False       # FSDP keeps parameters, gradients and optimizer state on CPU
    # DualPipeV with ep > 1: a pair's all-to-alls behind its other half's compute; None: on GPUs
    # only (on CPU processes the two threads share the cores, which measured slower)
    overlap: bool | None = None

    def __post_init__(self):
        for name in ("dp", "ep", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParallelError(f"--{name} = {value!r}: must be a positive integer")
        if self.dp % self.ep:
            raise ParallelError(f"--ep {self.ep} must divide --dp {self.dp}: expert-parallel groups "
                                "are made of data-parallel ranks")
        if self.schedule not in SCHEDULES:
            raise ParallelError(f"--pp-schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ParallelError(f"param_dtype {self.param_dtype!r}: choose None (the parameters' own) or 'bf16'")
        if not isinstance(self.microbatches, int) or self.microbatches < 0:
            raise ParallelError(f"--microbatches = {self.microbatches!r}: must be >= 0 (0: two per stage)")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp

    @property
    def n_stages(self) -> int:
        """Pipeline stages: DualPipeV puts two (a V) on every pp rank."""
        return 2 * self.pp if self.schedule == "dualpipev" else self.pp

    @property
    def n_microbatches(self) -> int:
        return self.microbatches or 2 * self.n_stages

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ParallelError(f"--dp {self.dp} x --pp {self.pp} = {self.world_size} processes, but "
                                f"{world_size} were started; launch with torchrun --nproc-per-node "
                                f"{self.world_size} or change the flags")


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed() -> tuple[int, int]:
    """Join the torchrun job (NCCL on GPUs, gloo on CPU) once; returns (rank, world size).
    Without torchrun's environment: one process, no process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        return 0, 1
    if device_type() == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device_type() == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


@dataclass
class Meshes:
    """The run's DeviceMesh and the sub-meshes the parallel code uses (a flattened dimension
    is kept here: slicing it from the root again is deprecated)."""
    world: DeviceMesh
    pp: DeviceMesh
    dp: DeviceMesh
    edp: DeviceMesh
    ep: DeviceMesh


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first, the other ranks after it (e.g. to read what it wrote)."""
    others = dist.is_initialized() and dist.get_world_size() > 1
    if others and dist.get_rank() != 0:
        dist.barrier()
    yield
    if others and dist.get_rank() == 0:
        dist.barrier()


def build_mesh(cfg: ParallelConfig) -> Meshes:
    """The (pp, edp, ep) mesh with `dp` = (edp, ep) flattened; needs the process group."""
    cfg.check_world(dist.get_world_size())
    world = init_device_mesh(device_type(), (cfg.pp, cfg.dp // cfg.ep, cfg.ep),
                             mesh_dim_names=("pp", "edp", "ep"))
    dp = world["edp", "ep"]._flatten("dp")
    return Meshes(world, world["pp"], dp, world["edp"], world["ep"])
