"""Run the apps in Flower's Ray simulation (``pfdiff fed``): one ServerApp run per Dirichlet α and seed.

Each run lives in ``<output_dir>/<name>/alpha-<α>/`` (one seed) or ``…/alpha-<α>/seed-<s>/`` (several seeds;
checkpoints, ``results.json``); running the same command again resumes where it stopped. Nothing here trains: it wires ``server_app.run_server`` and
``client_app.app`` into ``flwr.simulation.run_simulation``.

On a GPU (``cfg.device`` resolves to CUDA here): Ray is started with every visible GPU and each simulated
client asks for ``fed.client_gpus`` of one, so Ray places it on a GPU and it runs its models there (the
ServerApp runs in this process, on ``cfg.device``). Otherwise no GPU is given to Ray, its clients see
none and ``device: auto`` resolves to the CPU in every process.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from flwr.app import Context  # noqa: E402
from flwr.common.logger import ConsoleHandler  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from pfdiff.config import RunConfig  # noqa: E402
from pfdiff.runs import atomic_write_text  # noqa: E402
from pfdiff.config import dump_config  # noqa: E402

log = logging.getLogger("pfdiff.federated")


def alpha_dir(root: Path, alpha: float) -> Path:
    return root / ("iid" if alpha == 0 else f"alpha-{alpha:g}")


def run_dir(root: Path, alpha: float, seed: int, seeds: list[int]) -> Path:
    """One (α, seed) run: ``alpha_dir(root, α)`` when ``seeds`` holds one seed (the layout before several
    seeds), else ``alpha_dir(root, α)/seed-<seed>/`` (``federated.report.load_results`` reads both)."""
    return alpha_dir(root, alpha) if len(seeds) == 1 else alpha_dir(root, alpha) / f"seed-{seed}"


def run_overrides(alpha: float, seed: int) -> list[str]:
    """The ``--set`` overrides that make a config the (α, seed) run: its seed is the run's only seed, so the
    server and every client (``cfg.seeds[0]``) train, sample and draw their clients with it."""
    return [f"fed.alpha={float(alpha)!r}", f"seeds=[{int(seed)}]"]


# Ray puts Unix sockets under <temp>/session_<date>_<time>_<pid>/sockets/plasma_store (≈ 65 characters) and
# AF_UNIX paths are limited to 107 bytes, so Ray's temp dir must be short.
_RAY_SUFFIX = 70
_AF_UNIX_MAX = 107


@contextmanager
def ray_temp_dir() -> Iterator[dict[str, str]]:
    """Ray's session state in a fresh temp dir (never inside the results), removed afterwards; yields the
    ``init_args`` entry, or ``{}`` (Ray's default, logged) when the temp dir's path is too long for Ray's sockets."""
    temp = Path(tempfile.mkdtemp(prefix="pfdiff-ray-"))
    try:
        if len(str(temp)) + _RAY_SUFFIX > _AF_UNIX_MAX:
            log.warning("temp dir path %s too long for Ray's sockets: Ray's session state goes to its default", temp)
            yield {}
        else:
            yield {"_temp_dir": str(temp)}
    finally:
        shutil.rmtree(temp, ignore_errors=True)


# Flower log lines a pfdiff user can do nothing about (shown with ``pfdiff -v``)
FLOWER_NOISE = ("DEPRECATED FEATURE", "fraction_evaluate is set to 0.0")
# Python warnings of the libraries under the simulation, also in Ray's workers (shown with ``pfdiff -v``)
_WARNINGS_NOISE = ("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::PendingDeprecationWarning")


class _DropFlowerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in str(record.msg) for n in FLOWER_NOISE)


@contextmanager
def flower_output(verbosity: int) -> Iterator[None]:
    """Flower's log once and at pfdiff's verbosity (0 ``-q``: errors, 1: Flower's INFO progress without its
    deprecation notices, 2 ``-v``: everything, DEBUG included); library deprecation/future warnings hidden
    below 2 (here and, through ``PYTHONWARNINGS``, in Ray's workers). Restores everything on exit.

    Flower's ``flwr`` logger has level DEBUG and its own console handler, whose level is the one that counts:
    ``pfdiff.federated`` turns its propagation to the root logger off (the root's handler printed every
    line a second time, DEBUG ones too)."""
    flwr = logging.getLogger("flwr")
    own = [h for h in flwr.handlers if isinstance(h, ConsoleHandler)]  # not a handler a user added
    saved = flwr.propagate, [(h, h.level) for h in own], os.environ.get("PYTHONWARNINGS")
    noise = _DropFlowerNoise()
    flwr.propagate = False  # already so (pfdiff.federated's __init__); kept off here whatever changed it
    for h in own:
        h.setLevel({0: logging.ERROR, 1: logging.INFO, 2: logging.DEBUG}[verbosity])
        if verbosity < 2:
            h.addFilter(noise)
    if verbosity < 2:  # Ray starts its workers with this process's environment
        os.environ["PYTHONWARNINGS"] = ",".join(w for w in (saved[2], *_WARNINGS_NOISE) if w)
    try:
        with warnings.catch_warnings():
            if verbosity < 2:
                for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
                    warnings.simplefilter("ignore", category)
            yield
    finally:
        flwr.propagate = saved[0]
        for h, level in saved[1]:
            h.setLevel(level)
            h.removeFilter(noise)
        if saved[2] is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = saved[2]


def ray_resources(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Ray ``init_args`` resources, per-client resources): the GPUs and a ``fed.client_gpus`` share per client
    when ``cfg.device`` resolves to CUDA, else none (as without a GPU)."""
    import torch

    from pfdiff.training import resolve_device

    f = cfg.fed
    gpus = torch.cuda.device_count() if resolve_device(cfg.device).type == "cuda" else 0
    return ({"num_cpus": f.num_cpus, "num_gpus": gpus},
            {"num_cpus": 1, "num_gpus": float(f.client_gpus) if gpus else 0.0})


def simulate(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """One federated run (``cfg.fed.alpha``) with ``cfg.fed.num_clients`` simulated SuperNodes."""
    from flwr.simulation import run_simulation

    from pfdiff.federated.client_app import app as client_app
    from pfdiff.federated.server_app import check_plan, run_server

    check_plan(cfg)  # refuse before Ray starts
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    sink: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            sink["results"] = run_server(grid, cfg, run_dir)
        except BaseException as exc:  # surfaced below: Flower only logs a ServerApp's exception
            sink["error"] = exc
            raise

    from pfdiff import training

    ray_init, client_resources = ray_resources(cfg)
    with ray_temp_dir() as ray_temp, flower_output(training.verbosity()):
        init_args = {**ray_init, "include_dashboard": False, **ray_temp}
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.fed.num_clients,
                       backend_config={"client_resources": client_resources, "init_args": init_args})
    if "error" in sink:
        raise RuntimeError(f"the federated run failed: {sink['error']!r}") from sink["error"]
    if "results" not in sink:
        raise RuntimeError("the federated simulation did not finish (see the Flower log above)")
    return sink["results"]
