"""The main job runs end to end on the built-in data, and the data is what it claims."""

import subprocess
import sys

import numpy as np

from nvalchemi_jax.cli import main
from nvalchemi_jax.datasets import argon_systems, fcc_cluster, fcc_crystal


def test_evaluate_runs(capsys):
    main(["evaluate", "--systems", "6", "--max-atoms", "120", "--rows", "6"])
    out = capsys.readouterr().out
    assert "Lennard-Jones argon: 6 systems" in out
    assert "mean_energy_per_atom_eV" in out


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "nvalchemi_jax", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--systems" in result.stdout


def test_argon_systems_sizes_and_reproducibility():
    data = argon_systems(40, seed=3, min_atoms=32, max_atoms=200)
    sizes = [len(p) for p in data["positions"]]
    assert min(sizes) >= 32 and max(sizes) <= 200
    kinds = {bool(np.all(p)) for p in data["pbc"]}
    assert kinds == {True, False}          # crystals and clusters both present
    again = argon_systems(40, seed=3, min_atoms=32, max_atoms=200)
    np.testing.assert_array_equal(data["positions"][7], again["positions"][7])
    # Crystals fill their cell: number density of FCC argon, 4 / a^3.
    i = next(k for k, p in enumerate(data["pbc"]) if np.all(p))
    density = sizes[i] / abs(np.linalg.det(data["cell"][i]))
    assert 0.9 * 4 / 5.26**3 < density < 1.1 * 4 / 5.26**3


def test_fcc_helpers():
    positions, cell = fcc_crystal((2, 3, 4), lattice=4.0)
    assert positions.shape == (96, 3)
    np.testing.assert_allclose(np.diag(cell), [8.0, 12.0, 16.0])
    cluster = fcc_cluster(13, lattice=4.0)        # the 12 nearest neighbours around a site
    d = np.linalg.norm(cluster - cluster[0], axis=1)
    np.testing.assert_allclose(np.sort(d)[1:], 4.0 / np.sqrt(2), rtol=1e-12)


def test_console_script_exit_status_and_workflow(tmp_path):
    """The installed command's exit status is 0 and a tiny workflow writes every system."""
    import zarr

    config = tmp_path / "w.toml"
    config.write_text('[data]\nsystems = 3\nmax_atoms = 64\n[run]\nmax_systems = 3\nmax_atoms = 256\n'
                      '[[stages]]\nkind = "fire"\nfmax = 0.1\n[[stages]]\nkind = "nve"\nsteps = 5\n')
    out = tmp_path / "out.zarr"
    result = subprocess.run([sys.executable, "-m", "nvalchemi_jax", "--config", str(config), "--output", str(out),
                             "--no-progress"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(zarr.open_group(str(out), mode="r")["sample_id"][:].tolist()) == [0, 1, 2]


def test_workflow_on_device_writes_every_system(tmp_path):
    """``on_device = true`` in [run] (``--on-device``): the same workflow with refills decided
    on the device writes every system, with both stages done."""
    import zarr

    from nvalchemi_jax import workflow
    from nvalchemi_jax.cli import run_workflow

    out = tmp_path / "out.zarr"
    config = workflow.load(overrides={
        "data": {"systems": 5, "max_atoms": 64},
        "run": {"max_systems": 2, "max_atoms": 256, "on_device": True, "output": str(out)},
        "stages": [{"kind": "fire", "fmax": 0.1}, {"kind": "nve", "steps": 5}]})
    summary = run_workflow(config, progress=False)
    assert summary["written"] == 5 and summary["failed"] == 0
    group = zarr.open_group(str(out), mode="r")
    assert sorted(group["sample_id"][:].tolist()) == [0, 1, 2, 3, 4]
    assert set(group["status"][:].tolist()) == {2}
