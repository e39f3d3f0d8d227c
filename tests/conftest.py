import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (nanoseek/kernels) run in Triton's interpreter, on CPU tensors; set before
    # any kernel module is imported, since triton.jit reads it when it wraps a function
    os.environ.setdefault("TRITON_INTERPRET", "1")


def float32_tolerance(config, context: int, magnitude: float) -> float:
    """How far two float32 computations of one forward may drift apart when they sum in other
    orders (cached vs recomputed, one expert path vs another): the unit roundoff times the
    reduction lengths chained through the layers (hidden size, MLP width, context), times
    the output's magnitude."""
    chain = (config.num_hidden_layers + 1) * (config.hidden_size + config.intermediate_size + context)
    return torch.finfo(torch.float32).eps * chain * magnitude


@pytest.fixture
def hopper(monkeypatch):
    """A pretend H200: the device queries of a path choice, answered without a GPU."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def few_threads():
    """At most 2 torch threads for a module (the CI machine's cores), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models gain nothing from more, and lose much (many
    times their run time) when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """The tiny preset with its weights scaled by 5. The scaling does not make greedy choices
    more decisive: the gap between the top two logits stays ~0.22 of the logits' standard
    deviation (0.23 unscaled), since RMSNorm and a linear head keep that ratio. Two equal
    computations (cached vs recomputed, 1-token vs (k+1)-token forwards) pick the same tokens
    because float32 on one CPU computes them almost exactly alike."""
    from nanoseek import Transformer, preset
    torch.manual_seed(0)
    m = Transformer(preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(5)
    return m


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random tiny model with its byte tokenizer, from `nanoseek init` (the server tests' model)."""
    from nanoseek.cli import main
    out = tmp_path_factory.mktemp("serve") / "tiny"
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "0"]) == 0
    return out
