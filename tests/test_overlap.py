"""parallel/overlap.py: an overlapped DualPipeV pair's threads take turns at the MoE layers'
all-to-alls, so that exactly one of them communicates at a time, in the same order on every
rank, and the other computes meanwhile. Here the all-to-alls are stand-ins that record when
they run; the real ones, over gloo, are in test_parallel.py's four-rank test."""

import threading
import time

import pytest
import torch

from nanoseek.parallel import overlap
from nanoseek.parallel.overlap import TURNS, run_pair, turn_point


class Comm(torch.autograd.Function):
    """An all-to-all stand-in: records (side, what, layer) when it runs, forward and backward,
    and takes a little time so that a racing thread would show in the record."""

    @staticmethod
    def forward(ctx, x, log, what, layer):
        ctx.log, ctx.what, ctx.layer = log, what, layer
        log.append(("forward", what, layer))
        time.sleep(0.002)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(("backward", ctx.what, ctx.layer))
        time.sleep(0.002)
        return grad * 1.0, None, None, None


class OnBackward(torch.autograd.Function):
    """Identity whose backward calls `fn()` first (a stand-in for some backward work)."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad * 1.0, None


def moe_like(x, log, layer):
    """ExpertParallelExperts' shape of a layer: A dispatch B experts C combine D."""
    x = turn_point(x)
    x = turn_point(Comm.apply(x, log, "dispatch", layer))
    x = torch.tanh(x) * 1.5                            # the experts
    x = turn_point(x)
    x = turn_point(Comm.apply(x, log, "combine", layer))
    return torch.sin(x) + x                            # the rest of the block


def chunk(x, n_layers, log):
    for layer in range(n_layers):
        x = moe_like(x, log, layer)
    return x.sum()


@pytest.fixture
def turns():
    TURNS.enabled, TURNS.held = True, {"forward": 0, "backward": 0}
    yield TURNS
    TURNS.enabled = False
    TURNS.close()


@pytest.mark.parametrize("n_f,n_b", [(2, 2), (3, 1), (1, 3)])
def test_a_pair_communicates_one_thread_at_a_time_in_a_fixed_order(turns, n_f, n_b):
    log: list = []
    b_in = torch.randn(4, 8, requires_grad=True)
    b_loss = chunk(b_in, n_b, log)                      # its forward ran earlier, unpaired
    log.clear()
    f_in = torch.randn(4, 8, requires_grad=True)
    out = {}
    meetings = min(4 * n_f, 4 * n_b - 1)
    run_pair(lambda: out.setdefault("f", chunk(f_in, n_f, log)), lambda: b_loss.backward(), meetings)

    # each thread met `meetings` times
    assert turns.held == {"forward": meetings, "backward": meetings}
    # the all-to-alls alternate: the backward's first combine', then the forward's dispatch, the
    # backward's dispatch', the forward's combine, ... until one thread has met its last turn
    fwd = [("forward", what, layer) for layer in range(n_f) for what in ("dispatch", "combine")]
    bwd = [("backward", what, layer) for layer in reversed(range(n_b)) for what in ("combine", "dispatch")]
    paired = []
    for i in range(max(len(fwd), len(bwd))):
        paired += bwd[i:i + 1] + fwd[i:i + 1]
    assert log == paired                    # whichever thread runs out of turns, the other goes on alone
    # the same numbers as one after the other
    expect_f = chunk(f_in.detach().clone().requires_grad_(), n_f, [])
    assert torch.equal(out["f"], expect_f)
    ref_in = b_in.detach().clone().requires_grad_()
    chunk(ref_in, n_b, []).backward()
    assert torch.equal(b_in.grad, ref_in.grad)


def test_the_other_thread_computes_while_one_communicates(turns):
    """An all-to-all in one thread that ends only once the other thread's compute between the
    same two meetings has run: it ends (in turn, it would wait out its 10 s and report so)."""
    in_comm, computed, comm_saw = threading.Event(), threading.Event(), []

    class BlockingComm(Comm):
        @staticmethod
        def forward(ctx, x, log, what, layer):
            in_comm.set()
            comm_saw.append(computed.wait(timeout=10))
            return x * 1.0

    def compute():
        assert in_comm.wait(timeout=10)     # the all-to-all has begun
        computed.set()

    def f_chunk(x):
        x = turn_point(x)                                       # A (meets the backward's C')
        x = turn_point(BlockingComm.apply(x, [], "dispatch", 0))  # B
        return turn_point(turn_point(x)).sum()

    def b_chunk(x):
        x = turn_point(turn_point(x))
        x = OnBackward.apply(x, compute)    # backward: C' meets A, then compute() while the dispatch runs
        return turn_point(turn_point(x)).sum()

    b_loss = b_chunk(torch.randn(3, requires_grad=True))
    run_pair(lambda: f_chunk(torch.randn(3, requires_grad=True)), lambda: b_loss.backward(), 3)
    assert comm_saw == [True]


def test_an_error_in_the_backward_thread_is_raised_and_frees_the_forward(turns):
    def boom():
        raise ValueError("boom in the backward")

    b_in = torch.randn(4, 8, requires_grad=True)
    b_loss = OnBackward.apply(chunk(b_in, 2, []), boom)
    f_in = torch.randn(4, 8, requires_grad=True)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="boom in the backward"):
        run_pair(lambda: chunk(f_in, 2, []), lambda: b_loss.backward(), 7)
    assert time.perf_counter() - started < 30
    assert not any(t.name == "overlap-backward" for t in threading.enumerate())


def test_turn_points_are_identities_outside_an_overlapping_run():
    assert not TURNS.enabled
    x = torch.randn(3, requires_grad=True)
    assert turn_point(x) is x
    assert overlap.supported(object()) is False


def test_the_expert_exchange_leaves_its_waits_to_the_first_use(tmp_path):
    """expert_parallel.exchange: the received rows (forward) and the gradients sent back
    (backward) come as tensors waited on at their first use, so that on a GPU the other
    overlapped thread's kernels are not queued behind the all-to-all; the numbers are those
    of torch's own all_to_all_single (one gloo rank: the identity)."""
    import torch.distributed as dist
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    from nanoseek.parallel.expert_parallel import exchange
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        x = torch.randn(5, 3, requires_grad=True)
        seen = []
        x.register_hook(lambda g: seen.append(g) or g)
        y = exchange(x, [5], [5], dist.group.WORLD)
        assert isinstance(y, AsyncCollectiveTensor)
        (y * torch.arange(3.0)).sum().backward()
        assert isinstance(seen[0], AsyncCollectiveTensor)
        assert torch.equal(y.wait(), x.detach())
        assert torch.equal(x.grad, torch.arange(3.0).expand(5, 3))
    finally:
        dist.destroy_process_group()
