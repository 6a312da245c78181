"""ServerApp (Flower Message API) and a simulation runner for federated feature diffusion.

``app`` is the template-style ServerApp: it reads its settings from ``context.run_config`` (keys of
:data:`DEFAULTS`; ``flwr run`` fills them from a ``pyproject.toml`` ``[tool.flwr.app.config]``).
:func:`run_federated` runs the whole app in-process with Flower's Ray simulation runtime and returns
the per-round aggregated metrics.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from pfdiff.federated.strategy import FedDiffusionAvg  # noqa: E402
from pfdiff.federated.task import build_model  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 2,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "local-steps": 20,
    "lr": 1e-3,
    "batch-size": 64,
    "alpha": 0.0,  # Dirichlet α of the label skew; 0 ⇒ IID
    "seed": 0,
    "hidden": 64,
    "depth": 2,
}


def _settings(overrides: dict[str, Any] | None) -> dict[str, Any]:
    s = dict(DEFAULTS)
    s.update(overrides or {})
    return s


def run_server(grid: Grid, settings: dict[str, Any], sink: dict[str, Any] | None = None) -> None:
    """Build the strategy and run ``settings["num-server-rounds"]`` rounds; optionally record into ``sink``."""
    num_nodes = len(list(grid.get_node_ids()))
    model = build_model(int(settings["seed"]), int(settings["hidden"]), int(settings["depth"]))
    initial = ArrayRecord(model.state_dict())
    strategy = FedDiffusionAvg(fraction_train=float(settings["fraction-train"]),
                               fraction_evaluate=float(settings["fraction-evaluate"]),
                               min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=max(1, num_nodes))
    # sent to every client in every round (FedAvg adds "server-round")
    client_cfg = {k: settings[k] for k in ("local-steps", "lr", "batch-size", "alpha", "seed", "hidden", "depth")}
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(settings["num-server-rounds"]),
                            train_config=ConfigRecord(dict(client_cfg)),
                            evaluate_config=ConfigRecord(dict(client_cfg)))
    if sink is not None:
        sink["initial_arrays"] = initial
        sink["result"] = result
        sink["history"] = strategy.history


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Template entry point: settings from ``context.run_config`` over :data:`DEFAULTS`."""
    run_server(grid, _settings(dict(context.run_config)))


def make_server_app(settings: dict[str, Any], sink: dict[str, Any]) -> ServerApp:
    """A ServerApp bound to ``settings`` that records its ``Result`` into ``sink`` (in-process simulation)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, settings, sink)

    return server_app


def _arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in arrays.items()}


def run_federated(num_clients: int = 3, rounds: int = 2, alpha: float | None = None, seed: int = 0,
                  out_dir: str | Path | None = None, num_cpus: int = 2, **overrides: Any) -> dict[str, Any]:
    """Simulate ``num_clients`` SuperNodes for ``rounds`` rounds with Flower's Ray backend.

    ``alpha``: Dirichlet label-skew concentration (None ⇒ IID). ``overrides``: further :data:`DEFAULTS`
    keys (``local-steps``, ``lr``, …, with ``_`` accepted for ``-``). Returns ``{"rounds": {r: {train_loss,
    eval_loss, …}}, "initial_arrays", "final_arrays"}`` (arrays as name → numpy); with ``out_dir``, writes
    ``metrics.json`` and the final denoiser ``state_dict`` as ``denoiser.pt`` there.
    """
    from flwr.simulation import run_simulation

    from pfdiff.federated.client_app import app as client_app

    settings = _settings({k.replace("_", "-"): v for k, v in overrides.items()})
    settings.update({"num-server-rounds": rounds, "alpha": 0.0 if alpha is None else float(alpha), "seed": seed})
    sink: dict[str, Any] = {}
    run_simulation(server_app=make_server_app(settings, sink), client_app=client_app, num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": num_cpus, "num_gpus": 0}})
    if "result" not in sink:
        raise RuntimeError("the federated simulation did not finish (see the Flower log above)")
    result = sink["result"]
    out = {
        "settings": settings,
        "rounds": {int(r): dict(m) for r, m in sorted(sink["history"].items())},
        "initial_arrays": _arrays_to_numpy(sink["initial_arrays"]),
        "final_arrays": _arrays_to_numpy(result.arrays),
    }
    if out_dir is not None:
        out_path = Path(out_dir)
        out_path.mkdir(parents=True, exist_ok=True)
        (out_path / "metrics.json").write_text(json.dumps({"settings": settings, "rounds": out["rounds"]}, indent=2))
        torch.save(result.arrays.to_torch_state_dict(), out_path / "denoiser.pt")
    return out
