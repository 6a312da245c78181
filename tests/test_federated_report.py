"""The federated report: tables, a verdict computed from the numbers, privacy per mode, the rounds plot."""

import copy
import json

import pytest

from pfdiff.federated.report import load_results, plot_rounds, verdict, write_report

METHODS = ("fedavg", "fedddpm", "fedddpm+", "progressive")


def _acc(top1, few, medium=0.95, many=1.0):
    return {"top1": top1, "balanced": top1, "many": many, "medium": medium, "few": few}


def _history(rounds, method):
    """Rows shaped like server_app.run_method's history (keys are strings after JSON)."""
    out = {}
    for r in range(1, rounds + 1):
        row = {"replies": 3, "bytes": 1_000_000, "seconds": 0.5}
        if method != "fedavg":
            row["score"] = 1.0 / r
        if method == "progressive":
            row.update(gain=0.01, regenerated={"replaced": 2 * r, "generated": 5, "kept": 5},
                       pool={"size": 40, "mean_age": r / 2, "mean_score": 7.0, "share_from_warmup": 0.5})
        out[str(r)] = row
    if method == "fedddpm+":
        out[str(rounds)].update(quick_test_stop=True, score_after_one_shot=0.9 / rounds)
    return out


def _method(name, fd, few, rounds, planned=4, server_steps=20):
    return {"fd": fd, "repair": _acc(0.81, few), "repair_pseudo_kept": 99, "rounds": rounds,
            "rounds_saved": planned - rounds, "client_steps": rounds * 30, "server_steps": server_steps,
            "server_generated": 0, "server_seconds": 1.25, "final_score": 0.25, "bytes": rounds * 1_000_000,
            "history": _history(rounds, name)}


def _privacy_example():
    eps = {"fedavg": [1.1, 2.345, 0.9], "fedddpm": [1.5, 3.125, 1.2]}
    return {"mode": "example", "target_epsilon": 8.0, "delta": 1e-5, "accountant": "pld",
            "methods": {m: {str(c): {"epsilon": e, "sigma": 1.0, "sample_rate": 0.1, "steps": 40}
                            for c, e in enumerate(v)} for m, v in eps.items()},
            "covered": ["local DP-SGD steps (warm-up and rounds)", "noisy class counts"],
            "declared_public": ["each client's number of examples"]}


def fake_results(alpha=0.5, privacy=None):
    """A trimmed copy of a real results.json (α = 0.5, 3 clients, 4 rounds)."""
    return {
        "alpha": alpha, "num_clients": 3,
        "baselines": {"fedavg-ce": _acc(0.777, 0.566), "fedavg-ce+la": _acc(0.783, 0.606),
                      "fedavg-reweight": _acc(0.789, 0.589)},
        "methods": {"fedavg": _method("fedavg", 70.1255, 0.634, 4, server_steps=0),
                    "fedddpm": _method("fedddpm", 70.268, 0.634, 4),
                    "fedddpm+": _method("fedddpm+", 107.1, 0.646, 2),
                    "progressive": _method("progressive", 70.29, 0.634, 4)},
        "warmup": {"upload": "features", "model_bytes": 595428, "bytes_per_feature": 264.007, "crossover_n": 2255,
                   "upload_bytes_per_client": [8584, 15976, 36839], "pool_size": 205, "val_size": 41},
        "bytes": {"sent": {"encoder": 2_000_000, "diffusion/fedavg": 3_600_000},
                  "received": {"encoder": 1_900_000, "diffusion/fedavg": 3_500_000},
                  "per_client": {str(c): {"sent": 1_800_000, "received": 1_700_000} for c in range(3)},
                  "total": 11_000_000},
        "failures": [],
        "privacy": privacy or {"mode": "none", "claim": "no differential privacy: every release is computed "
                                                        "from private data without a guarantee"},
        "seconds": 82.81, "counts": [139, 89, 58, 37, 24, 15, 10, 6, 4, 2],
        "groups": {"many": [0], "medium": [1, 2, 3, 4], "few": [5, 6, 7, 8, 9], "rule": "thresholds"},
    }


@pytest.fixture
def results():
    iid = fake_results(alpha=0, privacy=_privacy_example())
    iid["client_histograms"] = [[50, 30, 20, 12, 8, 5, 3, 2, 1, 1], [45, 30, 19, 13, 8, 5, 4, 2, 2, 0],
                                [44, 29, 19, 12, 8, 5, 3, 2, 1, 1]]
    iid["fd_reference"] = {"real_train": 3.5, "warmup_pool": 60.25}
    skewed = fake_results(alpha=0.5)
    skewed["failures"] = [{"phase": "diffusion/fedavg", "round": 2, "node": 7, "partition": 1,
                           "reason": "no reply within 60 s"}]
    return {"IID": iid, "α=0.5": skewed}


def test_report_has_every_method_partition_and_formatted_numbers(tmp_path, results):
    text = write_report(tmp_path, results).read_text()
    for name in (*METHODS, "fedavg-ce", "fedavg-ce+la", "fedavg-reweight", "### IID", "### α=0.5"):
        assert name in text
    # FD with 2 decimals (lowest in bold), accuracies with 3, rounds (saved), server seconds, MB
    assert "**70.13**" in text and "| 107.10 |" in text and "0.646" in text and "| 2 (2) |" in text
    assert "| 1.2 |" in text and "| 4.0 |" in text
    assert "595,428" in text and "2,255" in text and "3/3" in text  # warm-up: every upload below a model
    assert "| encoder | 2.0 / 1.9 | 2.0 / 1.9 |" in text  # bytes per phase
    assert "real train 3.50, warmup pool 60.25" in text
    assert "## Per-client class histograms" in text and "| 0 | 50 | 30 |" in text
    assert "- IID: none" in text and "- α=0.5: 1" in text and "no reply within 60 s" in text
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_verdict_is_computed_from_the_numbers(results):
    res = results["α=0.5"]
    text = "\n".join(verdict("α=0.5", res))
    assert "lowest FD: `fedavg` (70.13)" in text
    assert "FD 70.27 vs 70.13 (+0.14): higher" in text
    assert "few-class accuracy 0.634 vs 0.634 (+0.000): equal" in text
    assert "beat" not in text and "better" not in text  # one run per partition: no spread, no claim
    assert "`fedddpm+` stopped after 2 of 4 rounds, saving 2 rounds, 60 client steps and 2.0 MB" in text
    assert "`fedavg-ce+la` (0.606)" in text

    better = copy.deepcopy(res)
    better["methods"]["fedddpm"]["fd"] = 50.0
    better["methods"]["fedddpm"]["repair"]["few"] = 0.7
    better["methods"]["fedddpm+"]["rounds_saved"] = 0
    text = "\n".join(verdict("α=0.5", better))
    assert "lowest FD: `fedddpm` (50.00)" in text
    assert "FD 50.00 vs 70.13 (-20.13): lower" in text and "(+0.066): higher" in text
    assert "ran all 2 rounds (the quick test never stopped it)" in text
    one = copy.deepcopy(res)
    one["methods"]["fedddpm+"].update(rounds=3, rounds_saved=1)
    assert "stopped after 3 of 4 rounds, saving 1 round," in "\n".join(verdict("α=0.5", one))


def test_privacy_section_per_mode(tmp_path, results):
    results["α=0.5"]["privacy"] = {"mode": "client", "delta": 1e-5, "declared_public": ["class counts"],
                                   "methods": {"fedavg": {"client_level_epsilon": 4.5678, "rounds": 4}}}
    results["α=0.1"] = fake_results(alpha=0.1)
    text = write_report(tmp_path, results).read_text()
    privacy = text.split("## Privacy", 1)[1]
    assert "mode `example`" in privacy and "**2.345**" in privacy and "**3.125**" in privacy
    assert "| **max** | 2.345 | 3.125 |" in privacy and "any one method is 3.125" in privacy
    assert "noisy class counts" in privacy and "each client's number of examples" in privacy
    assert "mode `client`" in privacy and "| fedavg | 4.568 | 4 |" in privacy
    assert "no differential-privacy claim" in privacy.split("### α=0.1", 1)[1]


def test_plot_rounds_writes_a_png_linked_from_the_report(tmp_path, results):
    path = plot_rounds(tmp_path, results)
    assert path == tmp_path / "fed_rounds.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](fed_rounds.png)" in write_report(tmp_path, results).read_text()


def test_load_results_labels_and_orders_partitions(tmp_path):
    for sub, alpha in [("alpha-10", 10.0), ("iid", 0), ("alpha-0.5", 0.5), ("alpha-0.1", 0.1)]:
        (tmp_path / sub).mkdir()
        data = fake_results(alpha)
        if sub == "alpha-0.1":
            del data["alpha"]  # falls back to the directory name
        (tmp_path / sub / "results.json").write_text(json.dumps(data))
    loaded = load_results(tmp_path)
    assert list(loaded) == ["IID", "α=0.1", "α=0.5", "α=10"]
    assert loaded["α=0.5"]["methods"]["fedavg"]["fd"] == 70.1255


def test_no_rounds_plot_when_only_fedavg_ran(tmp_path, results):
    for res in results.values():  # FedAvg records no score per round and has no pool
        res["methods"] = {"fedavg": res["methods"]["fedavg"]}
    (tmp_path / "fed_rounds.png").write_bytes(b"stale")  # an earlier render's plot is not linked as this one's
    assert plot_rounds(tmp_path, results) is None and not (tmp_path / "fed_rounds.png").exists()
    text = write_report(tmp_path, results).read_text()
    assert "fed_rounds.png" not in text and "## Rounds" not in text


def test_rounds_plot_only_for_partitions_with_a_series(tmp_path, results):
    results["α=0.5"]["methods"] = {"fedavg": results["α=0.5"]["methods"]["fedavg"]}
    assert plot_rounds(tmp_path, results) == tmp_path / "fed_rounds.png"


def test_creffs_validation_curve_alone_makes_a_rounds_plot(tmp_path, results):
    from pfdiff.federated.report import _creff_curves

    for res in results.values():
        res["methods"] = {"fedavg": res["methods"]["fedavg"]}  # no score, no pool: only CReFF's curve is left
    assert plot_rounds(tmp_path, results) is None
    results["α=0.5"]["baselines"]["creff"] = {**_acc(0.7, 0.5), "rounds": 3, "chosen_round": 2,
                                              "val_per_round": {"1": 0.6, "2": 0.8, "3": 0.7}}
    assert _creff_curves(results["α=0.5"]) == {None: ([(1, 0.6), (2, 0.8), (3, 0.7)], 2)}
    assert plot_rounds(tmp_path, results) == tmp_path / "fed_rounds.png"


def test_skipped_reweight_baseline_is_named_with_its_reason(tmp_path, results):
    res = results["α=0.5"]
    del res["baselines"]["fedavg-reweight"]
    res["skipped_baselines"] = {"fedavg-reweight": "fed.reweight_rounds = 0: no re-weighting round"}
    res["num_clients"] = 1
    text = write_report(tmp_path, results).read_text()
    part = text.split("### α=0.5", 1)[1].split("## Verdict", 1)[0]
    assert "| fedavg-reweight |" not in part and "`fedavg-reweight` skipped: fed.reweight_rounds = 0" in part
    assert "1 client;" in part and "1 clients" not in part


def test_skipped_baselines_follow_the_config():
    from pfdiff.config import load_config
    from pfdiff.federated.server_app import skipped_baselines

    assert skipped_baselines(load_config("federated", ["fed.reweight_rounds=2"])) == {}
    assert "reweight_rounds = 0" in skipped_baselines(load_config("federated", ["fed.reweight_rounds=0"]))[
        "fedavg-reweight"]


# ---------------------------------------------------------------- several seeds (issue 19)


def _two_seeds(tmp_path):
    """alpha-0.5/seed-0 and seed-1: fedddpm's FD far below fedavg's in both, few-class accuracy close."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    s0, s1 = fake_results(0.5), fake_results(0.5)
    s0["methods"]["fedddpm"]["fd"], s1["methods"]["fedddpm"]["fd"] = 50.0, 52.0
    s1["methods"]["fedavg"]["fd"] = 71.0
    s0["methods"]["fedddpm"]["repair"]["few"], s1["methods"]["fedddpm"]["repair"]["few"] = 0.634, 0.640
    s1["methods"]["fedavg"]["repair"]["few"] = 0.600
    s1["methods"]["fedddpm+"]["fd"] = 105.0
    s1["privacy"] = _privacy_example()
    for seed, data in ((0, s0), (1, s1)):
        (tmp_path / "alpha-0.5" / f"seed-{seed}").mkdir(parents=True)
        (tmp_path / "alpha-0.5" / f"seed-{seed}" / "results.json").write_text(json.dumps(data))
    (tmp_path / "iid").mkdir()  # a partition of one seed, in the layout before several seeds
    (tmp_path / "iid" / "results.json").write_text(json.dumps(fake_results(0)))
    return load_results(tmp_path)


def test_several_seeds_are_loaded_per_partition(tmp_path):
    loaded = _two_seeds(tmp_path)
    assert list(loaded) == ["IID", "α=0.5"] and "per_seed" not in loaded["IID"]
    assert list(loaded["α=0.5"]["per_seed"]) == [0, 1]
    assert loaded["α=0.5"]["per_seed"][1]["methods"]["fedavg"]["fd"] == 71.0


def test_report_aggregates_seeds_with_mean_and_std_and_claims_only_beyond_the_spread(tmp_path):
    from pfdiff.federated.report import aggregate

    results = _two_seeds(tmp_path)
    agg = aggregate(results["α=0.5"])
    assert agg["fedavg"]["fd"]["mean"] == pytest.approx((70.1255 + 71.0) / 2)
    assert agg["fedavg"]["fd"]["std"] == pytest.approx(abs(71.0 - 70.1255) / 2 ** 0.5)  # sample std
    assert agg["fedavg-ce"]["fd"] is None and agg["fedavg-ce"]["few"]["std"] == 0.0
    assert agg["fedavg"]["mb"]["mean"] == pytest.approx(4.0) and agg["fedddpm+"]["rounds"]["mean"] == 2
    assert agg["fedavg-ce"]["mb"] is None and agg["fedavg-ce"]["rounds"] is None  # it generates nothing

    text = write_report(tmp_path, results).read_text()
    part = text.split("### α=0.5", 1)[1].split("## Verdict", 1)[0]
    assert "Mean ± std over 2 seeds (0, 1):" in part and "#### seed 0" in part and "#### seed 1" in part
    assert "| fedavg | 70.56 ± 0.62 | 0.617 ± 0.024 | 0.810 ± 0.000 |" in part
    assert "| fedddpm | 51.00 ± 1.41 |" in part
    iid = text.split("### IID", 1)[1].split("### α=0.5", 1)[0]
    assert "One seed: no spread (± n/a)." in iid and "70.13 ± n/a" in iid and "0.634 ± n/a" in iid

    verdict_text = text.split("## Verdict", 1)[1].split("## Warm-up", 1)[0]
    skewed = verdict_text.split("**α=0.5** (2 seeds)", 1)[1]
    # the FD gap (−19.56) exceeds the spread (1.41 + 0.62): a claim
    assert "`fedddpm` beats `fedavg` on FD (51.00 ± 1.41 vs 70.56 ± 0.62, gap -19.56)" in skewed
    # few: gap +0.020 < spread 0.004 + 0.024: withheld
    assert "`fedddpm` is within the spread (0.028) of `fedavg` on few accuracy" in skewed
    assert "`fedddpm+` does not beat `fedddpm` on FD" in skewed
    assert "Strongest baseline on few accuracy: `fedavg-ce+la`" in skewed
    iid_verdict = verdict_text.split("- **IID**", 1)[1].split("**α=0.5**", 1)[0]
    assert "beat" not in iid_verdict and "within the spread" not in iid_verdict  # one seed: no claims

    # per-run sections: one column / heading per (partition, seed)
    assert "| phase | IID | α=0.5, seed 0 | α=0.5, seed 1 |" in text
    privacy = text.split("## Privacy", 1)[1]
    assert "### α=0.5, seed 1: mode `example`" in privacy and "### α=0.5, seed 0: mode `none`" in privacy


def test_creffs_rounds_and_bytes_are_aggregated_like_the_methods(tmp_path):
    from pfdiff.federated.report import aggregate

    results = _two_seeds(tmp_path)
    for seed, run in results["α=0.5"]["per_seed"].items():
        run["baselines"]["creff"] = {**run["baselines"]["fedavg-ce"], "rounds": 3, "bytes": (1 + seed) * 1_000_000,
                                     "upload_bytes": 200_000}
    agg = aggregate(results["α=0.5"])
    assert agg["creff"]["rounds"]["mean"] == 3 and agg["creff"]["mb"]["mean"] == pytest.approx(1.5)
    # upload MB: CReFF's clients' uploads; a method's, what the wire received in its diffusion rounds
    assert agg["creff"]["upload_mb"]["mean"] == pytest.approx(0.2)
    assert agg["fedavg"]["upload_mb"]["mean"] == pytest.approx(3.5) and agg["fedddpm"]["upload_mb"] is None
    results["α=0.5"]["per_seed"][1]["baselines"]["creff"]["chosen_round"] = 2
    text = write_report(tmp_path, results).read_text()
    assert "`creff`: 3 rounds, 2.0 MB sent+received (0.2 MB uploaded by the clients); its classifier from round 2, " \
           "chosen on the validation split" in text


def test_claims_need_two_seeds_even_with_large_gaps(results):
    res = copy.deepcopy(results["α=0.5"])
    res["methods"]["fedddpm"]["fd"] = 10.0
    assert "beat" not in "\n".join(verdict("α=0.5", res))
    res["per_seed"] = {0: copy.deepcopy(res), 1: copy.deepcopy(res)}  # two identical seeds: std 0
    text = "\n".join(verdict("α=0.5", res))
    assert "`fedddpm` beats `fedavg` on FD" in text and "is within the spread (0.000) of `fedavg` on few" in text


def test_sampled_runs_state_what_each_clients_epsilon_counts(tmp_path, results):
    from pfdiff.federated.server_app import PARTICIPATION

    results["IID"]["privacy"]["participation"] = PARTICIPATION
    text = write_report(tmp_path, results).read_text()
    assert "Client sampling: each client's ε counts only the rounds it was sent" in text


# ---------------------------------------------------------------- the bar of issue 19: the best variant vs CReFF


def _with_creff(results, creff_few, creff_bal, few_by_seed):
    """Two seeds of α=0.5 with a CReFF row; ``few_by_seed``: progressive's few-class accuracy per seed (the
    others stay at ≤ 0.640, so progressive is the best variant)."""
    for seed, run in results["α=0.5"]["per_seed"].items():
        run["baselines"]["creff"] = {**_acc(creff_bal[seed], creff_few[seed]), "rounds": 4, "bytes": 500_000}
        run["methods"]["progressive"]["repair"]["few"] = few_by_seed[seed]
    return results


def test_creff_verdict_claims_a_win_only_beyond_the_spread_and_states_the_shortfall(tmp_path):
    from pfdiff.federated.report import creff_verdict

    res = _with_creff(_two_seeds(tmp_path), {0: 0.50, 1: 0.52}, {0: 0.80, 1: 0.80}, {0: 0.70, 1: 0.72})["α=0.5"]
    text = "\n".join(creff_verdict("α=0.5", res))
    assert "Every variant against CReFF (for information: the best of them on the test set is not a pick): 4 of 4 " \
           "meet the bar" in text  # CReFF's few: 0.51, theirs ≥ 0.6
    assert "no validation numbers in these results, so no variant is picked" in text
    assert ("`progressive`: **beats CReFF on few-class accuracy without losing balanced accuracy**: few 0.710 ± 0.014 "
            "vs 0.510 ± 0.014 (gap +0.200, spread 0.028)") in text
    assert "Bytes: the diffusion methods 2.0–4.0 MB in their rounds (+ 0.1 MB of warm-up uploads for the pool " \
           "methods) vs CReFF 0.5 MB (4× or more): not an equal-bytes comparison." in text

    res = _with_creff(_two_seeds(tmp_path / "b"), {0: 0.60, 1: 0.80}, {0: 0.80, 1: 0.80}, {0: 0.70, 1: 0.72})["α=0.5"]
    text = "\n".join(creff_verdict("α=0.5", res))  # progressive: gap +0.010, spread 0.014 + 0.141
    assert "`progressive`: does not beat CReFF on few-class accuracy (short of the spread by 0.146)" in text
    assert "0 of 4 meet the bar." in text

    res = _with_creff(_two_seeds(tmp_path / "c"), {0: 0.50, 1: 0.52}, {0: 0.95, 1: 0.95}, {0: 0.70, 1: 0.72})["α=0.5"]
    assert "**loses balanced accuracy**" in "\n".join(creff_verdict("α=0.5", res))  # balanced 0.81 vs 0.95

    one = copy.deepcopy(res["per_seed"][0])
    assert "one seed, no claim" in "\n".join(creff_verdict("α=0.5", one))
    del one["baselines"]["creff"]
    assert creff_verdict("α=0.5", one) == []  # no CReFF row: no sentence


def test_the_variant_held_against_creff_is_picked_on_the_validation_split_not_the_test_set(tmp_path):
    from pfdiff.federated.report import creff_verdict, validation_pick, aggregate

    # progressive is best on the test set (few 0.70/0.72); fedddpm has the best validation balanced accuracy
    res = _with_creff(_two_seeds(tmp_path), {0: 0.50, 1: 0.52}, {0: 0.80, 1: 0.80}, {0: 0.70, 1: 0.72})["α=0.5"]
    val = {"fedavg": 0.60, "fedddpm": 0.75, "fedddpm+": 0.70, "progressive": 0.55}
    for seed, run in res["per_seed"].items():
        for name, v in val.items():
            run["methods"][name]["repair"]["validation"] = {"balanced": v + 0.01 * seed}
        run["baselines"]["creff"]["validation"] = {"balanced": 0.99}  # a baseline is never the pick
    assert validation_pick(aggregate(res), list(val)) == "fedddpm"
    text = "\n".join(creff_verdict("α=0.5", res))
    pick = text.split("\n")[0]
    assert "the variant picked on the validation split (highest mean validation balanced accuracy of 4 variants: " \
           "0.755 ± 0.007): `fedddpm`" in pick
    assert "few 0.637 ± 0.004 vs 0.510 ± 0.014" in pick and "progressive" not in pick
    table = write_report(tmp_path, {"α=0.5": res}).read_text()
    assert "val. balanced" in table and "| 0.755 ± 0.007 |" in table

    for run in res["per_seed"].values():  # one variant at CReFF's bytes: named, the others' factor stated
        run["methods"]["fedavg"]["bytes"] = 600_000
    text = "\n".join(creff_verdict("α=0.5", res))
    assert "vs CReFF 0.5 MB: comparable bytes (within 1.5×) only for `fedavg`; the others 4×–8×." in text


def test_coverage_section_averages_the_few_classes_and_names_the_reference(tmp_path):
    from pfdiff.federated.report import coverage_cells

    results = _two_seeds(tmp_path)
    few = [5, 6, 7, 8, 9]
    for seed, run in results["α=0.5"]["per_seed"].items():
        for name, m in run["methods"].items():
            recall = [0.9] * 10
            for c in few:
                recall[c] = 0.2 + 0.1 * seed if name == "fedddpm" else 0.5
            recall[9] = None if name == "fedddpm" else recall[9]  # a class without samples is skipped
            m["coverage"] = {"precision": [0.8] * 10, "recall": recall, "recall_train": [0.6] * 10,
                             "generated": [100] * 10, "reference": "held-out pool", "reference_per_class": [50] * 10}
    cells = coverage_cells(results["α=0.5"])
    assert cells["fedddpm"]["recall"]["mean"] == pytest.approx(0.25)
    assert cells["fedddpm"]["recall"]["std"] == pytest.approx(0.1 / 2 ** 0.5)
    assert "fedavg-ce" not in cells  # no coverage recorded: no row
    text = write_report(tmp_path, results).read_text()
    section = text.split("## Coverage of held-out features", 1)[1].split("## Warm-up", 1)[0]
    assert "Reference: held-out pool, per class 0:50, 1:50" in section
    assert "| fedddpm | 0.800 ± 0.000 | 0.250 ± 0.071 | 0.600 ± 0.000 | 0.800 ± 0.000 | 0.900 ± 0.000 |" in section
    assert "### IID" not in section  # the IID partition recorded no coverage


def test_pfdiff_report_re_renders_a_federated_root(tmp_path):
    from typer.testing import CliRunner

    from pfdiff.cli import app

    _two_seeds(tmp_path)
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "Mean ± std over 2 seeds" in (tmp_path / "report.md").read_text()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not a pfdiff run directory" in missing.output


def test_an_epsilon_over_the_target_is_flagged_with_the_phases_sent_twice(tmp_path, results):
    from pfdiff.federated.report import privacy_section

    assert "Over the target" not in "\n".join(privacy_section(results))  # every ε ≤ 8
    p = results["IID"]["privacy"]
    p.update(target_epsilon=3.0, private_sends={"stats": 2, "warmup": 1})  # fedddpm's client 1: 3.125
    text = "\n".join(privacy_section(results))
    assert "**Over the target ε = 3:** `fedddpm` 3.125 (largest client); phases executed more than once: stats 2×" \
        in text and "`fedavg`" not in text.split("Over the target", 1)[1].split("\n", 1)[0]


def test_roots_of_other_configurations_join_as_tagged_variants_on_one_encoder(tmp_path):
    from typer.testing import CliRunner

    from pfdiff.cli import app
    from pfdiff.federated.report import render

    _two_seeds(tmp_path / "hist")
    other = tmp_path / "balanced"
    _two_seeds(other)
    for path in other.glob("alpha-0.5/seed-*/results.json"):  # the other root's FedDDPM is better on few
        data = json.loads(path.read_text())
        data["methods"]["fedddpm"]["repair"]["few"] = 0.9
        data["bytes"]["received"]["diffusion/fedddpm"] = 2_500_000
        path.write_text(json.dumps(data))
    before = (tmp_path / "hist" / "report.md").exists()
    path = render(tmp_path / "hist", [other])
    assert path.name == "report-combined.md" and (tmp_path / "hist" / "report.md").exists() == before
    text = path.read_text()
    assert "`…@balanced`: " in text and "| fedddpm@balanced |" in text and "| fedddpm |" in text
    assert "| fedddpm@balanced | 51.00 ± 1.41 | 0.900 ± 0.000 |" in text
    assert "| 2.5 ± 0.0 |" in text  # its upload MB came along under the tagged name

    bad = json.loads((other / "alpha-0.5" / "seed-1" / "results.json").read_text())
    bad["baselines"]["fedavg-ce"]["few"] = 0.1  # another encoder
    (other / "alpha-0.5" / "seed-1" / "results.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="another fedavg-ce"):
        render(tmp_path / "hist", [other])
    res = CliRunner().invoke(app, ["report", str(tmp_path / "hist"), "--with", str(other)])
    assert res.exit_code == 2 and "another fedavg-ce" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "hist"), "--with", str(tmp_path / "hist")])
    assert res.exit_code == 2 and "distinct" in res.output
