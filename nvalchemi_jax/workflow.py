"""A workflow described by a TOML file (or a dict): data, model, stages, run settings.

```toml
[data]                      # built-in generated argon systems
systems = 1000
min_atoms = 32
max_atoms = 500
seed = 0

[model]
kind = "lennard_jones"      # or "morse", "soft_sphere"
sigma = 3.40
epsilon = 0.0104
cutoff = 8.5
switch_on = 8.0             # optional smooth cutoff (or shift = true)

[[stages]]
kind = "fire"               # fire, fire2, cell_fire, nve, nvt_langevin, nvt_nose_hoover, npt, nph
fmax = 0.05

[[stages]]
kind = "nvt_langevin"
steps = 300
dt = 5.0
temperature = 60.0
friction = 0.01

[run]
max_systems = 256           # capacity
max_atoms = 32768
refill_frequency = 10
on_device = false           # true: the dataset on the device, refills decided there
output = "relaxed_then_md.zarr"
```
"""

from __future__ import annotations

import copy
import tomllib
from typing import Any

DEFAULT: dict[str, Any] = {
    "data": {"systems": 1000, "min_atoms": 32, "max_atoms": 500, "seed": 0},
    "model": {"kind": "lennard_jones", "sigma": 3.40, "epsilon": 0.0104, "cutoff": 8.5, "switch_on": 8.0},
    "stages": [{"kind": "fire", "fmax": 0.05},
               {"kind": "nvt_langevin", "steps": 300, "dt": 5.0, "temperature": 60.0, "friction": 0.01}],
    "run": {"max_systems": 256, "max_atoms": 32768, "refill_frequency": 10, "output": "relaxed_then_md.zarr",
            "max_steps": None, "on_device": False},
}


def load(path: str | None = None, overrides: dict | None = None) -> dict:
    """The default workflow, updated section by section from a TOML file and then ``overrides``."""
    config = copy.deepcopy(DEFAULT)
    layers = []
    if path is not None:
        with open(path, "rb") as f:
            layers.append(tomllib.load(f))
    if overrides:
        layers.append(overrides)
    for layer in layers:
        for section, values in layer.items():
            if section not in config:
                raise ValueError(f"workflow: unknown section [{section}]; expected one of {sorted(config)}")
            if section == "stages":
                config["stages"] = [dict(s) for s in values]
            else:
                unknown = set(values) - set(config[section]) - ({"shift", "switch_on", "depth", "alpha", "r0"}
                                                                  if section == "model" else set())
                if unknown:
                    raise ValueError(f"workflow: unknown keys {sorted(unknown)} in [{section}]")
                config[section].update(values)
    return config


def build_model(spec: dict):
    from nvalchemi_jax import models

    spec = dict(spec)
    kind = spec.pop("kind")
    builders = {"lennard_jones": models.LennardJones, "morse": models.Morse, "soft_sphere": models.SoftSphere}
    if kind not in builders:
        raise ValueError(f"workflow: unknown model kind {kind!r}; expected one of {sorted(builders)}")
    return builders[kind](**spec)


def build_stage(spec: dict, model):
    from nvalchemi_jax.dynamics import ConvergenceHook, Criterion
    from nvalchemi_jax.dynamics import integrators, optimizers

    spec = dict(spec)
    kind = spec.pop("kind")
    classes = {"fire": optimizers.FIRE, "fire2": optimizers.FIRE2, "cell_fire": optimizers.CellFIRE,
               "nve": integrators.NVE, "nvt_langevin": integrators.NVTLangevin,
               "nvt_nose_hoover": integrators.NVTNoseHoover, "npt": integrators.NPT, "nph": integrators.NPH}
    if kind not in classes:
        raise ValueError(f"workflow: unknown stage kind {kind!r}; expected one of {sorted(classes)}")
    fmax = spec.pop("fmax", None)
    stress = spec.pop("max_stress", None)
    steps = spec.pop("steps", None)
    criteria = []
    if fmax is not None:
        criteria.append(Criterion("fmax", float(fmax)))
    if stress is not None:
        criteria.append(Criterion("stress", float(stress)))
    convergence = ConvergenceHook(tuple(criteria)) if criteria else None
    if convergence is None and steps is None:
        raise ValueError(f"workflow: stage {kind!r} needs fmax (optimizers) or steps (MD)")
    return classes[kind](model, convergence=convergence, n_steps=steps, **spec)
