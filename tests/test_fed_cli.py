"""`pfdiff fed` output (Flower's log once, noise hidden, Ray outside the results), `pfdiff deploy` argument
checks and `pfdiff runs` on directories written here."""

import io
import logging
import os
import warnings

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest  # noqa: E402

pytest.importorskip("flwr")

from pfdiff.federated import simulation  # noqa: E402


@pytest.fixture
def flower_streams():
    """(Flower's own console output, the root handler's output) as StringIOs, restored afterwards."""
    from flwr.common.logger import ConsoleHandler

    flwr = logging.getLogger("flwr")
    handlers = [h for h in flwr.handlers if isinstance(h, ConsoleHandler)]  # (pytest adds its own to it)
    own, root_out = io.StringIO(), io.StringIO()
    old_streams = [h.setStream(own) for h in handlers]
    root_handler = logging.StreamHandler(root_out)  # what `logging.basicConfig` of the CLI installs: no level
    logging.getLogger().addHandler(root_handler)
    yield own, root_out
    logging.getLogger().removeHandler(root_handler)
    for h, s in zip(handlers, old_streams):
        h.setStream(s)


def test_flower_log_lines_show_once_without_noise(flower_streams):
    own, root_out = flower_streams
    flwr = logging.getLogger("flwr")
    with simulation.flower_output(1):
        flwr.info("configure_train: Sampled 3 nodes (out of 3)")
        flwr.debug("Using InMemoryLinkState")
        flwr.warning("DEPRECATED FEATURE: The `run_simulation` function is deprecated")
        flwr.error("ClientApp raised an exception")
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("Tip: in future versions of Ray …", FutureWarning)
        assert "ignore::FutureWarning" in os.environ["PYTHONWARNINGS"]  # Ray's workers inherit it
    text = own.getvalue()
    assert text.count("Sampled 3 nodes") == 1 and "ClientApp raised" in text
    assert "InMemoryLinkState" not in text and "DEPRECATED" not in text
    assert root_out.getvalue() == ""  # not propagated: no second copy
    assert caught == []
    assert "ignore::FutureWarning" not in os.environ.get("PYTHONWARNINGS", "")  # restored


def test_flower_does_not_propagate_to_the_root_logger_in_any_process_of_the_app():
    """Opacus installs a root handler on import (in Ray workers, ServerApp and ClientApp processes too)."""
    import subprocess
    import sys

    code = ("import opacus, logging, pfdiff.federated.client_app; "
            "logging.getLogger('flwr').warning('once only')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr
    assert err.count("once only") == 1, err


def test_flower_output_verbose_shows_debug_and_quiet_only_errors(flower_streams):
    own, root_out = flower_streams
    flwr = logging.getLogger("flwr")
    with simulation.flower_output(2):
        flwr.debug("Using InMemoryLinkState")
        flwr.warning("DEPRECATED FEATURE: something")
    with simulation.flower_output(0):
        flwr.info("configure_train: Sampled 3 nodes (out of 3)")
        flwr.error("ClientApp raised an exception")
    text = own.getvalue()
    assert "InMemoryLinkState" in text and "DEPRECATED" in text
    assert "Sampled" not in text and text.count("ClientApp raised") == 1 and root_out.getvalue() == ""


def test_ray_temp_dir_is_outside_the_results_and_removed(tmp_path):
    with simulation.ray_temp_dir() as args:
        temp = args["_temp_dir"]
        assert os.path.isdir(temp) and not temp.startswith(str(tmp_path))
        assert len(temp) + simulation._RAY_SUFFIX <= simulation._AF_UNIX_MAX
    assert not os.path.exists(temp)


# ------------------------------------------------------------------ pfdiff deploy

SMALL_DEPLOY = ["--alpha", "0", "--set", "fed.encoder_rounds=1", "--set", "fed.encoder_local_steps=2",
                "--set", "fed.reweight_rounds=0", "--set", "fed.methods=[fedavg]", "--set", "fed.repair_epochs=1",
                "--set", "fed.rounds=1", "--set", "fed.local_steps=2"]


def _cli(*args):
    from typer.testing import CliRunner

    from pfdiff.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("args,needle", [
    (["--nodes", "0"], "--nodes must be between 1 and 64"),
    (["--nodes", "65"], "--nodes must be between 1 and 64"),
    (["--set", "fed.name=a b"], "no spaces inside one override"),
    (["--set", "fed.rounds=-1"], "fed.rounds"),
    (["--set", "fed.dp=client", "--set", "fed.encoder=public"], "covers the FedAvg rounds only"),
])
def test_deploy_refuses_bad_arguments_in_one_line_before_starting_anything(tmp_path, args, needle):
    res = _cli("deploy", "--out", str(tmp_path / "dep"), *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "dep").exists()  # no deployment started, nothing written


def _flower_pids(flwr_home) -> list[int]:
    """Live processes started for a deployment with this FLWR_HOME (any Flower process inherits it)."""
    from pathlib import Path

    needle, pids = f"FLWR_HOME={flwr_home}".encode(), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _deploy_cmd(out, *args):
    import sys

    return [sys.executable, "-m", "pfdiff", "deploy", "--out", str(out), *args]


@pytest.mark.slow
def test_deploy_runs_the_smallest_config_and_stops_everything(tmp_path):
    """About 90 s on 2 CPU cores (every message starts a ClientApp process that imports torch)."""
    import json
    import subprocess

    out = tmp_path / "dep"
    res = subprocess.run(_deploy_cmd(out, "--nodes", "3", *SMALL_DEPLOY), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "finished:completed" in res.stdout and "aggregate_train: Received 3 results" in res.stdout  # streamed
    assert res.stdout.count("aggregate_train: Received 3 results and 0 failures") == 2  # each line once
    assert "fraction_evaluate" not in res.stdout
    results = json.loads((out / "iid" / "results.json").read_text())
    assert "fedavg" in results["methods"] and (out / "report.md").is_file()
    assert _flower_pids(out / "deploy" / "flwr-home") == []


@pytest.mark.slow
def test_deploy_stops_every_process_on_ctrl_c(tmp_path):
    import signal
    import subprocess
    import time

    out = tmp_path / "dep"
    proc = subprocess.Popen(_deploy_cmd(out, "--nodes", "2", *SMALL_DEPLOY), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # wait until the run is on the SuperLink
            if "submitted" in line:
                break
        home = out / "deploy" / "flwr-home"
        assert len(_flower_pids(home)) >= 3  # SuperLink and 2 SuperNodes at least
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in rest, rest[-3000:]
    deadline = time.monotonic() + 15  # Flower's helpers exit by themselves once their parent is gone
    while _flower_pids(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _flower_pids(home) == []


# ------------------------------------------------------------------ pfdiff runs

def _write_run(root, name, finished=False, age=3600.0, methods=("ldmlr", "cbdm")):
    import time

    path = root / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("methods: [" + ", ".join(methods) + "]\n")
    (path / "metrics.jsonl").write_text('{"stage": "train", "step": 1}\n' * 100)
    if finished:
        (path / "results.json").write_text("{}")
    old = time.time() - age
    for p in [path, *path.rglob("*")]:
        os.utime(p, (old, old))
    return path


def _write_fed(root, name, finished_parts=("iid",), unfinished_parts=("alpha-0.1",), age=3600.0):
    import time

    path = root / name
    for part in (*finished_parts, *unfinished_parts):
        (path / part).mkdir(parents=True)
        (path / part / "config.yaml").write_text("fed:\n  methods: [fedavg, fedddpm]\n")
        if part in finished_parts:
            (path / part / "results.json").write_text("{}")
    old = time.time() - age
    for p in [path, *path.rglob("*")]:
        os.utime(p, (old, old))
    return path


def test_runs_lists_status_methods_and_size(tmp_path):
    from pfdiff.run_list import list_runs

    _write_run(tmp_path, "quickstart-20250101-120000", finished=True)
    _write_run(tmp_path, "quickstart-20250102-120000")  # killed an hour ago
    _write_run(tmp_path, "quickstart-20250103-120000", age=5)  # written to 5 s ago
    _write_fed(tmp_path, "federated")
    (tmp_path / "not-a-run").mkdir()
    entries = {e.name: e for e in list_runs(tmp_path)}
    assert set(entries) == {"quickstart-20250101-120000", "quickstart-20250102-120000",
                            "quickstart-20250103-120000", "federated"}
    assert [entries[f"quickstart-2025010{i}-120000"].status for i in (1, 2, 3)] == ["finished", "incomplete",
                                                                                    "running"]
    assert entries["quickstart-20250101-120000"].methods == ["ldmlr", "cbdm"]
    assert entries["quickstart-20250101-120000"].size >= 100 * len('{"stage": "train", "step": 1}\n')
    fed = entries["federated"]
    assert fed.kind == "federated" and fed.status == "incomplete" and fed.methods == ["fedavg", "fedddpm"]
    assert fed.partitions == {"alpha-0.1": "incomplete", "iid": "finished"}


def test_runs_clean_failed_removes_only_incomplete_runs(tmp_path):
    done = _write_run(tmp_path, "a-20250101-120000", finished=True)
    killed = _write_run(tmp_path, "a-20250102-120000")
    live = _write_run(tmp_path, "a-20250103-120000", age=5)
    fed = _write_fed(tmp_path, "fed-partial")
    fed_dead = _write_fed(tmp_path, "fed-dead", finished_parts=(), unfinished_parts=("iid", "alpha-0.5"))

    preview = _cli("runs", str(tmp_path), "--clean-failed", "--dry-run")
    assert preview.exit_code == 0, preview.output
    assert preview.output.count("would remove") == 3 and killed.name in preview.output
    assert killed.exists() and (fed / "alpha-0.1").exists()  # a preview removes nothing

    res = _cli("runs", str(tmp_path), "--clean-failed")
    assert res.exit_code == 0, res.output
    assert done.exists() and live.exists() and not killed.exists()
    assert (fed / "iid" / "results.json").exists() and not (fed / "alpha-0.1").exists()  # finished part kept
    assert not fed_dead.exists()
    assert res.output.count("removed ") == 3


def test_runs_refuses_a_missing_root_and_a_lone_dry_run(tmp_path):
    res = _cli("runs", str(tmp_path / "nope"))
    assert res.exit_code == 2 and "is not a directory" in res.output and len(res.output.strip().splitlines()) == 1
    res = _cli("runs", str(tmp_path), "--dry-run")
    assert res.exit_code == 2 and "--clean-failed" in res.output


def test_runs_sees_every_seed_of_a_partition_and_cleans_only_the_failed_seed(tmp_path):
    from pfdiff.run_list import incomplete_paths, list_runs

    fed = _write_fed(tmp_path, "fedbench", finished_parts=("alpha-0.1/seed-0", "alpha-0.1/seed-1"),
                     unfinished_parts=("alpha-0.1/seed-2",))
    (entry,) = list_runs(tmp_path)
    assert entry.kind == "federated" and entry.status == "incomplete" and entry.methods == ["fedavg", "fedddpm"]
    assert entry.partitions == {"alpha-0.1/seed-0": "finished", "alpha-0.1/seed-1": "finished",
                                "alpha-0.1/seed-2": "incomplete"}
    assert incomplete_paths(entry) == [fed / "alpha-0.1" / "seed-2"]


def test_fed_dry_run_prints_every_runs_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "root"
    res = _cli("fed", "fedbench", "--dry-run", "--alpha", "0.5", "--set", "seeds=[0,1]", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert res.output.count("α = 0.5, seed") == 2 and f"{out}/alpha-0.5/seed-1" in res.output
    assert "20 clients (8 per round), examples per client" in res.output
    # 2 × 8 clients × 40 rounds × the denoiser's serialised MB per method; at most that for the quick test
    size = int(res.output.split("denoiser ", 1)[1].split(" B", 1)[0].replace(",", ""))
    line = next(x for x in res.output.splitlines() if x.strip().startswith("fedavg:"))
    assert f"— {2 * 8 * 40 * size / 1e6:.1f} MB sent+received" in line
    assert "≤ " in next(x for x in res.output.splitlines() if x.strip().startswith("fedddpm+:"))
    assert "no differential privacy" in res.output and not out.exists()

    dp = _cli("fed", "fedbench", "--dry-run", "--alpha", "0.5", "--set", "seeds=[0]", "--set", "fed.dp=example",
              "--set", "fed.encoder=public", "--set", "privacy.target_epsilon=1", "--out", str(out))
    assert dp.exit_code == 0, dp.output
    assert "example-level DP-SGD on every client: ε ≤ 1 per method" in dp.output and "E + G on the server" in dp.output
    refused = _cli("fed", "fedbench", "--dry-run", "--set", "fed.dp=example", "--out", str(out))
    assert refused.exit_code == 2 and "fed.encoder='public'" in refused.output and not out.exists()
