"""What every timed benchmark section shares: the section's context, timing helpers (medians and
relative inter-quartile ranges) and the report the rows go into."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import pyro
import torch

import bayes_fusion as bf


@dataclasses.dataclass
class Context:
    """What a section gets: the report its timed rows go into, the device, quick mode (few
    repeats: smoke runs and CI) and the output directory (for sections that write files)."""

    rep: Report
    device: torch.device
    quick: bool
    out: Path


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_and_spread(values) -> tuple[float, float]:
    """The median of ``values`` and their inter-quartile range relative to it."""
    med = statistics.median(values)
    q = statistics.quantiles(values, n=4) if len(values) >= 4 else [min(values), max(values)]
    return med, (q[-1] - q[0]) / med


def timeit(fn, device, reps, repeat, warmup=3):
    """Median seconds per call of ``fn`` and the relative IQR over ``repeat`` batches."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / reps)
    return median_and_spread(times)


def fit_step_time(model, args, reps, repeat, warmup=20, info_out=None, **fit_kw):
    """Median seconds per step of a real ``bf.fit`` run and the relative IQR, like timeit.

    The steps are timed from inside ``fit`` (a callback stamps the clock after each step), so
    everything a user's fit pays per step is in: batching, the KL weight, the loss, the
    NaN/inf checks, the optimizer. The first ``warmup`` steps (setup, tracing) are left out.
    """
    stamps = []
    steps = warmup + reps * repeat + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # collapse warnings on random data
        res = bf.fit(
            model,
            *args,
            num_steps=steps,
            progress=False,
            callback=lambda step, loss: stamps.append(time.perf_counter()),
            **fit_kw,
        )
    if info_out is not None:
        info_out.update(res.info)
    stamps = stamps[warmup:]
    times = [(stamps[(i + 1) * reps] - stamps[i * reps]) / reps for i in range(repeat)]
    return median_and_spread(times)


def interleaved(measures: dict, rounds: int) -> dict:
    """Run every measure once per round, the rounds one after another (a machine whose speed
    drifts then slows every case alike), and return name -> (median seconds over the rounds,
    relative IQR).

    :param measures: name -> a function returning seconds (e.g. one per step).
    """
    times: dict = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            times[name].append(measure())
    return {name: median_and_spread(values) for name, values in times.items()}


class Report:
    def __init__(self):
        self.rows = []

    def add(self, group, name, seconds, spread, baseline=None, target=None, note=""):
        ratio = None if baseline is None else seconds / baseline
        self.rows.append(
            {
                "group": group,
                "name": name,
                "ms": seconds * 1e3,
                "spread": spread,
                "ratio": ratio,
                "target": target,
                "note": note,
            }
        )
        shown = f"{ratio:.2f}x" if ratio is not None else "-"
        print(
            f"[{group}] {name}: {seconds * 1e3:.3f} ms (+-{spread:.0%}) ratio {shown} {note}",
            flush=True,
        )

    def markdown(self, meta):
        lines = [
            "# bayes_fusion benchmarks",
            "",
            "Ratios are against the baseline named in the case, measured in the same run.",
            "The memory row's 'time' column is MB.",
            "",
            "| " + " | ".join(f"{k}: {v}" for k, v in meta.items()) + " |",
            "",
            "| group | case | time (ms) | spread | ratio | target | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            target = r["target"] or "-"
            met = "-"
            if r["target"] and r["ratio"] is not None:
                at_least = r["target"].startswith(">=")  # a speed-up; otherwise an upper bound
                bound = float(r["target"].lstrip("<>=").rstrip("x"))
                ok = r["ratio"] >= bound if at_least else r["ratio"] <= bound
                met = "yes" if ok else f"no ({r['ratio'] / bound - 1:+.0%})"
            name = r["name"] + (f" ({r['note']})" if r["note"] else "")
            lines.append(
                f"| {r['group']} | {name} | {r['ms']:.3f} | {r['spread']:.0%} | "
                f"{ratio} | {target} | {met} |"
            )
        return "\n".join(lines) + "\n"


def rss_mb(key):
    import re

    text = Path("/proc/self/status").read_text()
    return int(re.search(key + r":\s+(\d+) kB", text).group(1)) / 1024


def peak_extra_mb(fn, device):
    """Peak extra memory of one call (CUDA: allocator peak; CPU: VmHWM after a reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = rss_mb("VmRSS")
        fn()
        return max(0.0, rss_mb("VmHWM") - base)
    except OSError:  # not Linux: no peak-RSS reset
        return float("nan")


def machine(device):
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
