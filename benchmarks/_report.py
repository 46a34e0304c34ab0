"""What every benchmark prints: a header (date, device, versions, precision) and JSON lines."""

import datetime
import json
import os
import platform
import statistics
import time

import jax


def header(precision: str | None = None) -> dict:
    return {"date": datetime.date.today().isoformat(), "device": str(jax.devices()[0].device_kind),
            "platform": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version(),
            "precision": precision or ("float64" if jax.config.jax_enable_x64 else "float32"),
            **({"xla_flags": os.environ["XLA_FLAGS"]} if os.environ.get("XLA_FLAGS") else {})}


def emit(rows: list[dict], out: str | None = None) -> None:
    """Print one JSON object per row (with the header) and optionally write them to ``out``."""
    lines = [json.dumps({**header(), **row}) for row in rows]
    print("\n".join(lines), flush=True)
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")


def median_seconds(fn, *args, repeat: int = 20) -> float:
    """Median wall time of ``fn(*args)`` (results waited for) after one untimed call."""
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def traced_events(fn) -> list[tuple[str, str, float, float]]:
    """Run ``fn()`` (results waited for) under ``jax.profiler``: ``(process, name, µs, start
    µs)`` of every complete event in the Perfetto trace JAX writes (processes ``/host:CPU``,
    ``/device:GPU:0``, ...; starts on one clock); empty if no trace was written."""
    import glob
    import gzip
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn())
        files = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        events = []
        if files:
            with gzip.open(files[0]) as f:
                events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return [(pids.get(e.get("pid"), ""), e["name"], e["dur"], e.get("ts", 0.0))
            for e in events if e.get("ph") == "X" and "dur" in e]


def gpu_kernels(fn) -> tuple[dict, dict]:
    """Run ``fn()`` (results waited for) under ``jax.profiler``: GPU microseconds and launches
    per kernel name (device-to-host copies included)."""
    from collections import defaultdict

    total, count = defaultdict(float), defaultdict(int)
    for process, name, us, _ in traced_events(fn):
        if "/device:GPU" in process:
            total[name] += us
            count[name] += 1
    return dict(total), dict(count)


def kernel_table(total: dict, count: dict, top: int = 60) -> dict:
    """The ``top`` kernels by GPU time: ``{name: [µs, launches]}``."""
    ranked = sorted(total, key=total.get, reverse=True)[:top]
    return {name[:90]: [round(total[name], 1), count[name]] for name in ranked}


def device_to_host(count: dict) -> int:
    """Device-to-host copies among the launches of :func:`gpu_kernels`."""
    return sum(n for name, n in count.items() if "MemcpyD2H" in name or "DtoH" in name)
