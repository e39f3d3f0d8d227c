"""DualPipe's overlap: one micro-batch's expert all-to-all hidden behind another's compute.

DualPipeV pairs the forward of one chunk with the backward of another (an OVERLAP_F_B action;
torch runs the two one after the other). Here the pair runs as two threads that take turns at
the MoE layers' communication boundaries, so that while one thread waits on an all-to-all the
other computes. Each MoE layer has four turn points in its forward, around the two all-to-alls
(A dispatch B, C combine D), and the same four in its backward, met in reverse (D' C' B' A').
The threads meet in this order, the backward's first D' passing straight into its all-to-all:

    forward   ..compute.. A ==dispatch== B ..experts.. C ==combine== D ..compute.. A ...
    backward  =combine'=  C' ..experts'.. B' =dispatch'= A' ..compute..  D' =combine'= C' ...

so that between two meetings exactly one thread communicates, and the order of the EP group's
collectives is the same on every rank. On a GPU both threads queue kernels on one stream: an
exchange's result, forward or backward, is waited on at its first use (expert_parallel's
`exchange`), after the next meeting, so that the kernels the other thread queued meanwhile do
not wait behind it. With n_f MoE layers in the forward chunk and n_b in the
backward, min(4·n_f, 4·n_b - 1) meetings; after them the thread still running goes on alone.

A pair whose backward is its stage's last runs in turn as torch does: that backward reduces the
data-parallel gradients, collectives the forward thread must not race. The runtime's own
bookkeeping (received activations, losses, backward counts) is torch's private API; where the
installed torch lacks any of it, DualPipeV runs without the overlap (`supported`).
"""

from __future__ import annotations

import threading
import weakref

import torch

_RUNTIME_NEEDS = ("fwd_recv_ops", "bwd_recv_ops", "backward_counter", "_n_microbatches", "_stages",
                  "_maybe_compute_loss", "_maybe_get_loss", "register_custom_function")


class Turns:
    """The meeting points of one overlapped forward/backward pair (none outside a pair)."""

    TIMEOUT_S = 600.0

    def __init__(self):
        self.enabled = False            # turn points are laid in every forward once a schedule overlaps
        self.barrier: threading.Barrier | None = None
        self.closed = False
        self.forward_thread = None
        self.left = {"forward": 0, "backward": 0}
        self.first_backward_point = True
        self.held = {"forward": 0, "backward": 0}       # meetings each side has kept, ever

    def open(self, meetings: int) -> None:
        self.barrier = threading.Barrier(2, timeout=self.TIMEOUT_S) if meetings else None
        self.closed = False
        self.forward_thread = threading.get_ident()
        self.left = {"forward": meetings, "backward": meetings}
        self.first_backward_point = True

    def close(self) -> None:
        self.closed = True
        if self.barrier is not None:
            self.barrier.abort()        # releases a thread left waiting by the other's error
        self.barrier = None

    def point(self, side: str) -> None:
        """A turn point reached by `side` ("forward" or "backward")."""
        barrier = self.barrier
        if barrier is None:
            return
        if side == "forward" and threading.get_ident() != self.forward_thread:
            return                      # a forward outside the pair (e.g. a recomputation)
        if side == "backward":
            if threading.get_ident() == self.forward_thread:
                return
            if self.first_backward_point:   # D' of its first layer: straight into the combine'
                self.first_backward_point = False
                return
        if self.left[side] == 0:
            return
        self.left[side] -= 1
        self.held[side] += 1
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            if not self.closed:         # a timeout: the two threads disagree on the turn points
                raise RuntimeError(f"overlapped DualPipeV pair: the other thread did not reach its turn point "
                                   f"in {self.TIMEOUT_S:.0f} s; run without the overlap (--no-overlap)") from None
            # else the other thread failed; run_pair raises its error


TURNS = Turns()


class _TurnPoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        TURNS.point("forward")
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        TURNS.point("backward")
        return grad


def turn_point(x: torch.Tensor) -> torch.Tensor:
    """x, marking a point where an overlapped pair's threads may take turns (identity). Laid
    in every forward of an overlapping run, since a chunk's backward may be paired although
    its forward was not."""
    if not TURNS.enabled or not torch.is_grad_enabled():
        return x
    return _TurnPoint.apply(x)


def supported(schedule) -> bool:
    """Whether the installed torch's pipeline runtime has what the overlap uses."""
    from torch.distributed.pipelining import schedules
    return all(hasattr(schedule, name) for name in _RUNTIME_NEEDS) and hasattr(schedules, "_wait_batch_p2p")


_MOE_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a stage's count, while it lives


def moe_layers(stage) -> int:
    """The expert-parallel MoE layers of a pipeline stage (a module walk: once per stage)."""
    from .expert_parallel import ExpertParallelExperts
    if stage not in _MOE_LAYERS:
        _MOE_LAYERS[stage] = sum(isinstance(m, ExpertParallelExperts) for m in stage.submod.modules())
    return _MOE_LAYERS[stage]


def overlap_f_b(action, ctx) -> None:
    """The OVERLAP_F_B custom function: the runtime's FORWARD and FULL_BACKWARD of its two
    sub-actions, run as a pair of threads taking turns (or in turn where they cannot)."""
    from torch.distributed.pipelining.schedules import _wait_batch_p2p
    schedule = ctx.schedule_ref
    stages = {s.stage_index: s for s in schedule._stages}
    fwd, bwd = action.sub_actions
    f_stage, b_stage = stages[fwd.stage_index], stages[bwd.stage_index]
    f_mb, b_mb = fwd.microbatch_index, bwd.microbatch_index

    if not f_stage.is_first and fwd.stage_index - 1 not in stages:
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((fwd.stage_index, f_mb)))
    if not b_stage.is_last and bwd.stage_index + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((bwd.stage_index, b_mb)))
    if hasattr(schedule, "_assert_unsharded"):  # FSDP: wait for the stages' unshards
        schedule._assert_unsharded(f_stage)
        schedule._assert_unsharded(b_stage)

    def forward():
        output = f_stage.forward_one_chunk(f_mb, ctx.arg_mbs[f_mb], ctx.kwarg_mbs[f_mb])
        schedule._maybe_compute_loss(f_stage, output, ctx.target_mbs, f_mb)
        if fwd.stage_index + 1 in stages:
            stages[fwd.stage_index + 1].set_local_fwd_input(output, f_mb)

    last = schedule.backward_counter[bwd.stage_index] + 1 == schedule._n_microbatches

    def backward():
        loss = schedule._maybe_get_loss(b_stage, b_mb)
        schedule.backward_counter[bwd.stage_index] += 1
        b_stage.backward_one_chunk(b_mb, loss=loss, full_backward=True, last_backward=last)
        if bwd.stage_index - 1 in stages:
            stages[bwd.stage_index - 1].set_local_bwd_input(b_stage.get_local_bwd_output(b_mb), b_mb)

    n_f, n_b = moe_layers(f_stage), moe_layers(b_stage)
    run_pair(forward, backward, 0 if last or not (n_f and n_b) else min(4 * n_f, 4 * n_b - 1))


def run_pair(forward, backward, meetings: int) -> None:
    """forward() on this thread and backward() on another, meeting `meetings` times at the
    turn points; one after the other when there is nothing to meet for."""
    if meetings == 0:
        forward()
        backward()
        return
    errors: list[BaseException] = []
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    stream = torch.cuda.current_stream() if device is not None else None
    threads = torch.get_num_threads()

    def backward_thread():
        try:
            # per thread: the CUDA device and stream, and OpenMP's intra-op thread count (which
            # splits the CPU kernels' sums: the same count gives the same roundings)
            torch.set_num_threads(threads)
            if device is not None:
                torch.cuda.set_device(device)
                torch.cuda.set_stream(stream)
            backward()
        except BaseException as e:      # noqa: BLE001 - re-raised on the calling thread
            errors.append(e)
            TURNS.close()

    TURNS.open(meetings)
    thread = threading.Thread(target=backward_thread, name="overlap-backward", daemon=True)
    thread.start()
    try:
        forward()
    except BaseException:
        TURNS.close()
        raise
    finally:
        thread.join()
        TURNS.close()
    if errors:
        raise errors[0]
