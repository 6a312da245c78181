"""The Flower app on a real local deployment: a SuperLink and 3 SuperNodes (subprocesses) run one short job."""

import json
import os
import tomllib
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest  # noqa: E402

pytest.importorskip("flwr")

from pfdiff.federated import deploy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_SUPERNODES = 3
# pfdiff config overrides (run-config key "set", where the app has it): 3 clients and the fewest phases
SMALL_SET = ("fed.num_clients=3 fed.encoder_rounds=1 fed.encoder_local_steps=2 fed.reweight_rounds=0 "
             "fed.methods=[fedavg] fed.repair_epochs=1")


def _defaults() -> dict:
    from pfdiff.federated.server_app import DEFAULTS

    return DEFAULTS


def test_pyproject_run_config_is_the_server_defaults():
    """``flwr run`` only accepts ``--run-config`` keys declared in ``[tool.flwr.app.config]``."""
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]
    assert flwr["app"]["config"] == _defaults()
    assert flwr["app"]["components"] == {"serverapp": "pfdiff.federated.server_app:app",
                                         "clientapp": "pfdiff.federated.client_app:app"}
    assert "federations" not in flwr  # Flower 1.42 would migrate it out and rewrite pyproject.toml


def _overrides(defaults: dict, run_dir: Path) -> dict:
    wanted = {"num-server-rounds": 1, "local-steps": 2, "set": SMALL_SET, "run-dir": str(run_dir)}
    return {k: v for k, v in wanted.items() if k in defaults}


def _is_live(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_superlink_and_three_supernodes_run_one_job(tmp_path):
    if not (deploy.executable("flower-superlink") and deploy.executable("flower-supernode")):
        pytest.skip("flower-superlink / flower-supernode executables not found")
    defaults = _defaults()
    run_dir = tmp_path / "run"
    dep = deploy.LocalDeployment(tmp_path / "deploy", num_supernodes=NUM_SUPERNODES)
    with dep:
        assert dep.online_nodes() == NUM_SUPERNODES
        info = dep.wait(dep.submit(ROOT, _overrides(defaults, run_dir)), timeout=600)
        seen = dep.alive_pids()  # SuperLink, SuperNodes and the SuperExecs they spawned
    assert info["status"] == "finished:completed"
    assert len(seen) >= 1 + NUM_SUPERNODES
    assert dep.alive_pids() == [] and not [pid for pid in seen if _is_live(pid)]
    assert all(p.popen.returncode is not None for p in dep.procs)
    assert any((dep.flwr_home / "apps").iterdir())  # the FAB went to our FLWR_HOME, not ~/.flwr
    if "run-dir" in defaults:
        results = json.loads((run_dir / "results.json").read_text())
        assert results.get("num_clients", NUM_SUPERNODES) == NUM_SUPERNODES
