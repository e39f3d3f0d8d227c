"""Training metrics: a JSONL log (and TensorBoard), plots, MFU and progress on stderr.

`run_dir/metrics.jsonl` holds one JSON object per logged step, flushed line by line, so a
killed run loses nothing it logged. The names the plots look for:

    step            int, always
    loss            total training loss; its parts main_loss, mtp_loss, balance_loss
    eval_loss       (or eval: {loss: ...}) held-out loss
    maxvio          {moe layer: MaxVio of that layer's expert loads this step}
    lr              learning rate
    tokens_per_s    training throughput; mfu beside it if known

Nested dicts stay nested in the JSON (their keys become strings there) and are flattened for
TensorBoard as `maxvio/layer_3` (integer keys) or `eval/loss` (other keys).
Non-finite values are written as NaN / Infinity, which Python's json reads back.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

# Peak dense BF16 tensor FLOP/s (no sparsity), from the vendors' datasheets. First match wins,
# so the specific names come before the families they belong to.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b.*\bNVL\b", 835e12),
    (r"\bH200\b.*\bNVL\b", 835e12),
    (r"\bH100\b", 989e12),        # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989e12),
    (r"\bH200\b", 989e12),        # SXM
    (r"\bGH200\b", 989e12),
    (r"\bB200\b", 2250e12),
    (r"\bA100\b", 312e12),
    (r"\bA800\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
    (r"\bMI300X\b", 1307e12),
]


# ============================================================================ JSONL + TensorBoard
class MetricsLogger:
    """Append `{"step": ..., ...}` lines to run_dir/metrics.jsonl, and to TensorBoard under
    run_dir/tb/ when the `tensorboard` package imports (`tensorboard=False` to skip it).

    Resuming: `resume_from_step=N` drops the lines with step >= N when the file is opened (and
    TensorBoard's events from N on, via purge_step), so that the file shows one history. Without
    it, a first `log()` whose step is not past the last one in the file does the same.
    A line cut short by a kill is dropped at open.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_from_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._tensorboard = tensorboard
        self._writer = None
        self._purge_step = resume_from_step
        records = _read_records(self.path) if self.path.exists() else None
        if records is not None:
            kept = [r for r in records if resume_from_step is None or _step(r) < resume_from_step]
            if len(kept) != len(records) or not _ends_clean(self.path):
                _rewrite(self.path, kept)
            records = kept
        self._last_step = max((_step(r) for r in records or []), default=None)
        self._first_log = True
        self._file = open(self.path, "a")

    def log(self, step: int, **values) -> dict:
        """Write one line; returns the record as written. Tensors become numbers."""
        step = int(step)
        if self._first_log:
            self._first_log = False
            if self._last_step is not None and step <= self._last_step:
                self._file.close()
                _rewrite(self.path, [r for r in _read_records(self.path) if _step(r) < step])
                self._file = open(self.path, "a")
                self._purge_step = step if self._purge_step is None else min(self._purge_step, step)
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        record.setdefault("time", time.time())
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._last_step = step
        writer = self._tb()
        if writer is not None:
            for name, value in flatten(record).items():
                if name not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(name, value, step)
        return record

    def _tb(self):
        if not self._tensorboard:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSONL only
                self._tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=self._purge_step)
        return self._writer

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _plain(value):
    """Tensors and numpy scalars -> Python numbers, recursively; dict keys -> str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if type(value).__module__ == "numpy":  # numpy scalar or array
        return value.tolist()
    return value


def flatten(record: dict, prefix: str = "") -> dict:
    """{"maxvio": {"3": 0.2}, "eval": {"loss": 2.1}} -> {"maxvio/layer_3": 0.2, "eval/loss": 2.1}"""
    out = {}
    for key, value in record.items():
        key = str(key)
        if prefix and re.fullmatch(r"\d+", key):
            key = f"layer_{key}"
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _step(record: dict) -> int:
    return int(record["step"])


def _ends_clean(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _read_records(path: Path) -> list[dict]:
    records = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # cut short by a kill
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and "step" in r:
                records.append(r)
    return records


def _rewrite(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (or of run_dir/metrics.jsonl), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return _read_records(path)


# ============================================================================ plots
def plot_metrics(metrics_jsonl: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png, maxvio.png, lr.png, throughput.png in out_dir, each when its data exist.
    Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_jsonl)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def series(get):
        xs, ys = [], []
        for r in records:
            v = get(r)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(r["step"])
                ys.append(v)
        return xs, ys

    def key(name):
        return lambda r: r.get(name)

    def save(fig, ax, name, title, ylabel):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # loss and its parts; the balance loss is orders of magnitude smaller: its own panel
    lines = [("loss", "total", key("loss")), ("main_loss", "main (next token)", key("main_loss")),
             ("mtp_loss", "MTP", key("mtp_loss")),
             ("eval_loss", "eval", _eval_loss)]
    drawn = [(label, *series(get)) for _, label, get in lines]
    drawn = [d for d in drawn if d[1]]
    balance = series(key("balance_loss"))
    has_balance = any(v != 0 for v in balance[1])
    if drawn:
        fig, axes = plt.subplots(1, 2 if has_balance else 1, figsize=(10 if has_balance else 6, 4),
                                 squeeze=False)
        ax = axes[0, 0]
        for label, xs, ys in drawn:
            if label == "eval":
                ax.plot(xs, ys, label=label, marker="o", markersize=3, linewidth=1.2)
            else:
                plot_smoothed(ax, xs, ys, label)
        ax.legend()
        if has_balance:
            bax = axes[0, 1]
            plot_smoothed(bax, *balance, None, color="tab:purple")
            bax.set_title("balance loss")
            bax.set_xlabel("step")
            bax.set_ylabel("loss")
            bax.grid(alpha=0.3)
        save(fig, ax, "loss.png", "training loss", "loss")

    # MaxVio per MoE layer and their mean
    layers = sorted({k for r in records if isinstance(r.get("maxvio"), dict) for k in r["maxvio"]},
                    key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, str(k)))
    if layers:
        fig, ax = plt.subplots(figsize=(6, 4))
        few = len(layers) <= 10
        cmap = plt.get_cmap("tab10" if few else "viridis")
        for i, layer in enumerate(layers):
            xs, ys = series(lambda r, k=layer: (r.get("maxvio") or {}).get(k))
            color = cmap(i) if few else cmap(i / (len(layers) - 1))
            ax.plot(xs, ys, color=color, linewidth=0.9, alpha=0.8,
                    label=f"layer {layer}" if len(layers) <= 12 else None)
        xs, ys = series(lambda r: (sum(r["maxvio"].values()) / len(r["maxvio"])
                                   if isinstance(r.get("maxvio"), dict) and r["maxvio"] else None))
        ax.plot(xs, ys, color="black", linewidth=2, label="mean")
        ax.legend(fontsize=7, ncol=2 if len(layers) > 6 else 1)
        save(fig, ax, "maxvio.png", "MaxVio per MoE layer (expert load imbalance)",
             "MaxVio = (max - mean) / mean load")

    xs, ys = series(key("lr"))
    if xs:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, linewidth=1.2)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        save(fig, ax, "lr.png", "learning rate", "lr")

    xs, ys = series(key("tokens_per_s"))
    if xs:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, linewidth=1.2, label="tokens/s")
        mx, my = series(key("mfu"))
        if mx:
            mfu_ax = ax.twinx()
            mfu_ax.plot(mx, [100 * v for v in my], color="tab:orange", linewidth=1, label="MFU")
            mfu_ax.set_ylabel("MFU (%)")
            handles = ax.get_legend_handles_labels()[0] + mfu_ax.get_legend_handles_labels()[0]
            ax.legend(handles=handles)
        save(fig, ax, "throughput.png", "training throughput", "tokens / s")
    return written


def smoothed(ys: list[float], span: float) -> list[float]:
    """Exponential moving average, weight 1/span on each new value, debiased as TensorBoard's
    smoothing is (divided by the weight the average has gathered, so the start is not pulled
    toward 0)."""
    alpha, avg, weight, out = 1.0 / span, 0.0, 0.0, []
    for y in ys:
        avg = (1 - alpha) * avg + alpha * y
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def plot_smoothed(ax, xs: list, ys: list[float], label: str | None, **style) -> None:
    """A per-step series faint, and over it in the same colour its moving average over a tenth
    of the run: RL rewards and small-batch losses are too noisy to read a trend from."""
    span = len(ys) / 10
    if span < 2:  # too few points for an average to say more than the points
        ax.plot(xs, ys, label=label, linewidth=1.2, **style)
        return
    (raw,) = ax.plot(xs, ys, linewidth=0.8, alpha=0.3, **style)
    ax.plot(xs, smoothed(ys, span), color=raw.get_color(), linewidth=1.6,
            label=None if label is None else f"{label} (smoothed)")


def _eval_loss(record: dict):
    if "eval_loss" in record:
        return record["eval_loss"]
    ev = record.get("eval")
    return ev.get("loss") if isinstance(ev, dict) else None


# ============================================================================ MFU
def peak_flops(device: torch.device | str | int | None = None) -> float | None:
    """Peak dense BF16 FLOP/s of a CUDA device (or of a device name such as
    'NVIDIA H100 80GB HBM3'); None on the CPU or for a device not in PEAK_BF16_FLOPS."""
    name = _device_name(device)
    if name is None:
        return None
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return flops
    return None


def _device_name(device) -> str | None:
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:
            return device  # not a device spec: a device name
    if isinstance(device, int):
        device = torch.device("cuda", device)
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def mfu(tokens_per_s: float, flops_per_token: float, device: torch.device | str | int | None = None,
        num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak dense BF16 FLOP/s of `num_devices`
    such devices. tokens_per_s is the total over those devices; flops_per_token the training
    FLOPs per token, `nanoseek.info.model_info(config, context_length=seq_len)
    ["train_flops_per_token"]` (forward + backward, attention included). None when the peak is
    unknown (CPU, unlisted device)."""
    peak = peak_flops(device)
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)


# ============================================================================ progress
class ProgressBar:
    """Progress of a long loop on stderr, with figures (loss, tokens/s, lr, ...) beside the
    count: a tqdm bar on a terminal; elsewhere (a log file, CI, `make run > log`) one line
    every `interval` seconds and one at the end, since a bar's carriage returns make an
    unreadable log. disable=True: nothing at all."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", disable: bool = False,
                 unit: str = "step", interval: float = 30.0):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self._n = self._start = self._printed = initial
        self._post: dict[str, str] = {}
        self._bar, self._lines = None, False
        if disable:
            return
        if sys.stderr.isatty():
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                             dynamic_ncols=True, smoothing=0.1)
        else:
            self._lines, self._t0, self._printed_at = True, time.monotonic(), None

    @property
    def done(self) -> int:
        return self._n

    def update(self, n: int, loss: float | None = None, tokens_per_s: float | None = None,
               lr: float | None = None, **extra) -> None:
        """Move to `n` done (steps, problems, ...) and show the figures given."""
        post = {}
        if loss is not None:
            post["loss"] = f"{float(loss):.4f}"
        if tokens_per_s is not None:
            post["tok/s"] = f"{float(tokens_per_s):,.0f}"
        if lr is not None:
            post["lr"] = f"{float(lr):.2e}"
        post.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in extra.items()
                     if v is not None})
        if self._bar is not None:
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(n - self._n)
        self._n, self._post = n, post
        if self._lines and (self._printed_at is None or time.monotonic() - self._printed_at >= self.interval):
            self._print_line()

    def _print_line(self) -> None:
        now = time.monotonic()
        print(progress_line(self.desc, self._n, self.total, self.unit, self._post, now - self._t0,
                            self._n - self._start), file=sys.stderr, flush=True)
        self._printed_at, self._printed = now, self._n

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is None:
            print(message, file=sys.stderr)
        else:
            self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._lines and self._n != self._printed:
            self._print_line()
        self._lines = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_line(desc: str, n: int, total: int, unit: str, figures: dict[str, str], elapsed: float,
                  done: int) -> str:
    """'pretrain 120/2000 steps (6%): loss=2.1000, tok/s=9,500; 00:42 elapsed, ETA 10:58'; the
    ETA at the pace of the `done` units this process did in `elapsed` seconds."""
    from tqdm import tqdm
    line = f"{desc} {n}/{total} {unit}s ({100 * n / max(total, 1):.0f}%)"
    if figures:
        line += ": " + ", ".join(f"{k}={v}" for k, v in figures.items())
    eta = tqdm.format_interval(elapsed / done * (total - n)) if done > 0 else "?"
    return f"{line}; {tqdm.format_interval(elapsed)} elapsed, ETA {eta}"
