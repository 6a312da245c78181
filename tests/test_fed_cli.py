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
    flwr = logging.getLogger("flwr")
    handlers = [h for h in flwr.handlers if isinstance(h, logging.StreamHandler)]
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
    assert flwr.propagate and "ignore::FutureWarning" not in os.environ.get("PYTHONWARNINGS", "")  # restored


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
