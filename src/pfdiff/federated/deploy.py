"""A real Flower deployment on localhost: one SuperLink and N SuperNodes as subprocesses.

Used by the deployment test and handy for manual checks::

    with LocalDeployment("runs/deploy", num_supernodes=3) as dep:
        run_id = dep.submit(".", {"num-server-rounds": 1, "local-steps": 2})
        info = dep.wait(run_id, timeout=300)   # the run's `flwr ls` record
    # every process started here (and their Flower children) is gone now

Everything is insecure (no TLS), bound to 127.0.0.1 on free ports picked at runtime, and written under
``workdir``: ``flwr-home/`` (``FLWR_HOME``: the Flower config file naming the connection, installed
FABs), ``superlink.db`` (SuperLink state) and ``logs/<process>.log``. Telemetry, the update check and
runtime dependency installation are off. The ServerApp's log (``flwr log``) is saved to
``logs/run-<id>.log``; the ClientApps print into ``logs/supernode-<i>.log``. Only Flower's own executables
and CLI are used (``flower-superlink``, ``flower-supernode``, ``flwr run|ls|log``, ``flwr supernode ls``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w

CONNECTION = "pfdiff-local"  # name of the SuperLink connection written into FLWR_HOME/config.toml
TAG_VAR = "PFDIFF_DEPLOY_TAG"  # env marker inherited by every process of one deployment


class DeploymentError(RuntimeError):
    """A process of the local deployment failed, or a run did not finish in time."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path


def executable(name: str) -> str | None:
    """Path of a Flower executable: next to the running Python first (the venv), then ``PATH``."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def tagged_pids(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``TAG_VAR=tag`` (Linux ``/proc``; else [])."""
    needle, pids = f"{TAG_VAR}={tag}".encode(), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and not _is_zombie(entry):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _is_zombie(proc_dir: Path) -> bool:
    return proc_dir.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def write_flower_config(flwr_home: Path, address: str) -> Path:
    """Write ``FLWR_HOME/config.toml`` with one insecure connection :data:`CONNECTION` to ``address``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    cfg = {"superlink": {"default": CONNECTION, CONNECTION: {"address": address, "insecure": True}}}
    path.write_text(tomli_w.dumps(cfg))
    return path


class LocalDeployment:
    """Context manager owning a SuperLink and ``num_supernodes`` SuperNodes on localhost.

    ``node_configs[i]`` is the ``--node-config`` of SuperNode ``i`` (default: ``partition-id=i
    num-partitions=N``, what :mod:`pfdiff.federated.client_app` reads).
    """

    def __init__(self, workdir: str | Path, num_supernodes: int = 3, node_configs: list[str] | None = None,
                 startup_timeout: float = 60.0):
        self.workdir = Path(workdir).resolve()
        self.num_supernodes = num_supernodes
        self.node_configs = node_configs or [f"partition-id={i} num-partitions={num_supernodes}"
                                             for i in range(num_supernodes)]
        self.startup_timeout = startup_timeout
        self.tag = uuid.uuid4().hex
        self.procs: list[Proc] = []
        self.port = 0
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, wait until it is healthy, then the SuperNodes, until all are registered."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        write_flower_config(self.flwr_home, f"127.0.0.1:{self.port}")
        self._spawn("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                  "--database", str(self.workdir / "superlink.db"),
                                  "--disable-runtime-dependency-installation"])
        self._wait_until("the SuperLink answers /health", self._superlink_healthy)
        for i, node_config in enumerate(self.node_configs):
            self._spawn(f"supernode-{i}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                           "--port", str(free_port()), "--node-config", node_config])
        self._wait_until(f"{self.num_supernodes} SuperNodes are online",
                         lambda: self.online_nodes() >= self.num_supernodes)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every started process group and every tagged descendant; SIGKILL what is left after ``grace`` s."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            targets = self.alive_pids()
            if not targets:
                return
            for p in self.procs:
                _signal_group(p.popen.pid, sig)
            for pid in targets:
                _signal_pid(pid, sig)
            deadline = time.monotonic() + wait
            while self.alive_pids() and time.monotonic() < deadline:
                time.sleep(0.2)

    def alive_pids(self) -> list[int]:
        """Live processes of this deployment: the ones started here and everything Flower spawned under them."""
        started = [p.popen.pid for p in self.procs if p.popen.poll() is None]
        return sorted(set(started) | set(tagged_pids(self.tag)))

    # ------------------------------------------------------------------ processes

    def env(self) -> dict[str, str]:
        """Environment of every process: own ``FLWR_HOME``, no telemetry/update check/dependency install."""
        env = dict(os.environ)
        bin_dir = str(Path(executable("flower-superlink") or sys.executable).parent)
        env.update({"FLWR_HOME": str(self.flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", TAG_VAR: self.tag,
                    "PATH": bin_dir + os.pathsep + env.get("PATH", "")})  # Flower spawns flower-superexec by name
        return env

    def _spawn(self, name: str, cmd: list[str]) -> None:
        exe = executable(cmd[0])
        if exe is None:
            raise DeploymentError(f"{cmd[0]} not found (is flwr installed in this environment?)")
        log = self.logs / f"{name}.log"
        with log.open("wb") as fh:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen([exe, *cmd[1:]], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.workdir, env=self.env(), start_new_session=True)
        self.procs.append(Proc(name, popen, log))

    def check_alive(self) -> None:
        """Raise :class:`DeploymentError` naming the first started process that has exited, with its log tail."""
        for p in self.procs:
            if p.popen.poll() is not None:
                raise DeploymentError(f"{p.name} exited with code {p.popen.returncode}; last lines of {p.log}:\n"
                                      f"{log_tail(p.log)}")

    def _wait_until(self, what: str, ready: Callable[[], bool], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while not ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out waiting until {what}; logs in {self.logs}")
            time.sleep(0.5)

    def _superlink_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    # ------------------------------------------------------------------ flwr CLI

    def flwr(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``flwr <args> --format json`` against this deployment and return the parsed JSON."""
        cmd = [executable("flwr") or "flwr", *args, "--format", "json"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env(), cwd=self.workdir, timeout=timeout)
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            out = {"success": False}
        if res.returncode != 0 or not out.get("success", False):
            detail = out.get("error-message") or f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            raise DeploymentError(f"`flwr {' '.join(args)}` failed (exit {res.returncode}):\n{detail}")
        return out

    def online_nodes(self) -> int:
        nodes = self.flwr("supernode", "ls", CONNECTION).get("nodes", [])
        return sum(1 for n in nodes if n.get("status") == "online")

    def submit(self, app_dir: str | Path, run_config: dict[str, Any] | None = None) -> int:
        """``flwr run app_dir`` on this deployment with ``run_config`` overrides (a TOML file); returns the run ID."""
        args = ["run", str(Path(app_dir).resolve()), CONNECTION]
        if run_config:
            path = self.workdir / f"run-config-{uuid.uuid4().hex[:8]}.toml"
            path.write_text(tomli_w.dumps(run_config))
            args += ["--run-config", str(path)]
        return int(self.flwr(*args)["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """The run's ``flwr ls --run-id`` record (``status`` is e.g. ``running`` or ``finished:completed``)."""
        return self.flwr("ls", CONNECTION, "--run-id", str(run_id))["runs"][0]

    def wait(self, run_id: int, timeout: float = 600.0, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Wait until the run finishes; return its ``flwr ls`` record, or raise unless it completed.

        ``flwr log --stream`` (the ServerApp's log, saved to ``logs/run-<id>.log`` and, given ``echo``, passed
        to it line by line) returns when the run finishes, so waiting costs no polling; the started processes
        are checked every half second.
        """
        deadline = time.monotonic() + timeout
        run_log = self.logs / f"run-{run_id}.log"
        while not (info := self.run_info(run_id))["status"].startswith("finished"):
            self._stream_log(run_id, run_log, deadline, echo)
            if time.monotonic() > deadline:
                raise DeploymentError(f"run {run_id} not finished after {timeout:.0f} s; last lines of {run_log}:\n"
                                      f"{log_tail(run_log)}")
        if info["status"] != "finished:completed":
            raise DeploymentError(f"run {run_id} {info['status']}: {info.get('status-details', '')}\n"
                                  f"last lines of {run_log}:\n{log_tail(run_log)}")
        return info

    def _stream_log(self, run_id: int, path: Path, deadline: float, echo: Callable[[str], None] | None = None) -> None:
        """Append ``flwr log <run_id> --stream`` to ``path`` (and ``echo`` each line) until it ends, a process
        dies or ``deadline``."""
        cmd = [executable("flwr") or "flwr", "log", str(run_id), CONNECTION, "--stream"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir)
        copier = threading.Thread(target=_copy_lines, args=(proc.stdout, path, echo), daemon=True)
        copier.start()
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                self.check_alive()
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            copier.join(timeout=5.0)
        if proc.returncode:  # e.g. the Control API was briefly unreachable: do not spin
            time.sleep(2.0)


def _copy_lines(stream: IO[bytes], path: Path, echo: Callable[[str], None] | None) -> None:
    with stream, path.open("ab") as fh:
        for line in stream:
            fh.write(line)
            fh.flush()
            if echo is not None:
                echo(line.decode(errors="replace").rstrip("\n"))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session=True, so pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_app(app_dir: str | Path, workdir: str | Path, run_config: dict[str, Any] | None = None,
            num_supernodes: int = 3, timeout: float = 600.0, echo: Callable[[str], None] | None = None
            ) -> dict[str, Any]:
    """Start a local deployment, run the app once, stop everything (also on errors and Ctrl-C); returns the
    run's ``flwr ls`` record. ``echo`` gets the SuperLink's progress and the ServerApp's log line by line."""
    say = echo or (lambda line: None)
    with LocalDeployment(workdir, num_supernodes) as dep:
        say(f"SuperLink on 127.0.0.1:{dep.port} and {num_supernodes} SuperNodes online; logs in {dep.logs}")
        run_id = dep.submit(app_dir, run_config)
        say(f"run {run_id} submitted")
        return dep.wait(run_id, timeout, echo)


def find_app_dir(start: str | Path | None = None) -> Path | None:
    """The Flower app to ``flwr run``: the pfdiff checkout this package was imported from (its
    ``pyproject.toml`` declares ``[tool.flwr.app]``), else ``start`` or the working directory if it does."""
    import tomllib

    candidates = [Path(__file__).resolve().parents[3], Path(start or Path.cwd()).resolve()]
    for d in candidates:
        try:
            if "app" in tomllib.loads((d / "pyproject.toml").read_text()).get("tool", {}).get("flwr", {}):
                return d
        except (OSError, tomllib.TOMLDecodeError):
            continue
    return None


# ---------------------------------------------------------------- `pfdiff deploy`: the checks before any process


@dataclass
class DeployRequest:
    """What `pfdiff deploy` runs, checked before any process starts: the config, the run config handed to
    ``flwr run`` (its ``set`` splits at spaces), the Flower app, the results root and the partition's folder."""

    cfg: Any
    run_config: dict[str, Any]
    app_dir: Path
    root: Path
    run_dir: Path


def deploy_request(config: str | None, overrides: list[str], nodes: int | None, alpha: float | None,
                   out: Path | None, app_dir: Path | None) -> DeployRequest:
    """Validate everything `pfdiff deploy` needs (raises ``ValueError``/``ConfigError`` with one line): node count,
    overrides without spaces, the config and its privacy plan, the app, Flower's executables."""
    import re

    from pfdiff.config import load_config
    from pfdiff.federated.server_app import check_plan
    from pfdiff.federated.simulation import alpha_dir

    if nodes is not None and not 1 <= nodes <= 64:
        raise ValueError(f"--nodes must be between 1 and 64 (one SuperNode process each), got {nodes}")
    overrides = [re.sub(r",\s+", ",", s.strip()) for s in overrides]  # "[a, b]" → "[a,b]"
    spaced = [s for s in overrides if len(s.split()) != 1]
    if spaced:
        raise ValueError(f"--set {spaced[0]!r}: no spaces inside one override (the run config splits them at spaces)")
    overrides += [*([f"fed.num_clients={nodes}"] if nodes is not None else []),
                  *([f"fed.alpha={float(alpha)!r}"] if alpha is not None else [])]
    source = config or "federated"
    if Path(source).is_file():  # the SuperLink's processes run elsewhere: an absolute path
        source = str(Path(source).resolve())
    cfg = load_config(source, overrides)
    check_plan(cfg)
    app = app_dir or find_app_dir()
    if app is None or not (app / "pyproject.toml").is_file():
        raise ValueError("the Flower app (a pyproject.toml with [tool.flwr.app]) was not found; pass --app DIR")
    missing = [x for x in ("flower-superlink", "flower-supernode", "flwr") if executable(x) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not found (is flwr installed in this environment?)")
    root = (out or Path(cfg.output_dir) / f"{cfg.name}-deploy").resolve()
    run_dir = alpha_dir(root, cfg.fed.alpha)
    return DeployRequest(cfg, {"config": source, "set": " ".join(overrides), "run-dir": str(run_dir)}, app, root,
                         run_dir)


class terminate_as_interrupt:
    """SIGTERM raises KeyboardInterrupt inside the block (so a killed `pfdiff deploy` stops its processes as
    Ctrl-C does); the previous handler is restored after it."""

    def __enter__(self):
        def _raise(signum, frame):
            raise KeyboardInterrupt

        self._previous = signal.signal(signal.SIGTERM, _raise)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

