"""What every benchmark prints: a header (date, device, versions, precision) and JSON lines."""

import datetime
import json
import platform
import statistics
import time

import jax


def header(precision: str | None = None) -> dict:
    return {"date": datetime.date.today().isoformat(), "device": str(jax.devices()[0].device_kind),
            "platform": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version(),
            "precision": precision or ("float64" if jax.config.jax_enable_x64 else "float32")}


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
