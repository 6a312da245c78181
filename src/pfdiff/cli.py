"""Command line: ``pfdiff run``, ``check``, ``config``, ``report``, ``fed``, ``attack``, ``audit``, ``evidence``, ``dpdm``,
``regimes``, ``presets``. Parses and delegates only.

``pfdiff check CONFIG`` (= ``pfdiff run CONFIG --dry-run``) runs every check ``run`` makes before its run directory
exists and prints the plan (data, stages and steps per pair, privacy releases and ε, a rough wall time from
benchmarks/results); it writes nothing. ``--dry-run`` with ``--resume`` is refused: a resumed run's plan is
``pfdiff check RUN_DIR/config.yaml``. ``pfdiff config [PRESET]`` prints the resolved config with comments."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

# no locals in tracebacks: they would print configs and, worse, tensors of private data
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="pfdiff: private, federated diffusion in feature space for long-tailed recognition.")
console = Console()
LOG_WIDTH = 160  # columns of tables printed to a file or pipe (no terminal to ask)
errors = Console(stderr=True, soft_wrap=True)  # one line per error (no wrapping), also with --quiet


def _fail(message: str) -> None:
    from rich.markup import escape

    errors.print(f"[bold red]error:[/] {escape(message)}")  # escaped: "[a, b]" in a message is text, not markup
    raise typer.Exit(2)


@app.callback()
def main(ctx: typer.Context,
         quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars; log messages from ERROR up"),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="a metrics line every log_every steps "
                                      "(also on a terminal) and INFO messages of pfdiff and its libraries")):
    """Options for every command (before the command: ``pfdiff -q run quickstart``)."""
    import logging

    from pfdiff.distributed import requested_world_size
    from pfdiff.training import set_verbosity

    if quiet and verbose:
        _fail("--quiet and --verbose exclude each other")
    if requested_world_size() > 1 and ctx.invoked_subcommand not in (None, "run"):
        _fail(f"only `pfdiff run` runs under torchrun (WORLD_SIZE={requested_world_size()}); "
              f"start `pfdiff {ctx.invoked_subcommand}` as one process")
    level = 0 if quiet else 2 if verbose else 1
    set_verbosity(level)
    logging.basicConfig(level={0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO}[level],
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def run(config: Optional[str] = typer.Argument(None, help="preset name or YAML file (default: quickstart)"),
        set_: list[str] = typer.Option([], "--set", help="override, e.g. --set diffusion.steps=2000"),
        resume: Optional[Path] = typer.Option(None, help="resume an interrupted run directory"),
        out: Optional[Path] = typer.Option(None, help="parent folder of the run directory (default: runs/)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="check and print the plan (as `pfdiff check`); "
                                     "write nothing, train nothing")):
    """Train and evaluate every configured method over all seeds; write a run directory and report.
    Under torchrun (``torchrun --nproc-per-node N -m pfdiff run …``) stages 1 and 2 split every batch between
    the N processes; only rank 0 writes the run directory, prints and renders the report (the others run the
    same pipeline into a scratch directory that is removed; to resume, rank 0 sends them its run directory)."""
    import tempfile

    from pfdiff import distributed
    from pfdiff.config import ConfigError, load_config
    from pfdiff.data import DataError
    from pfdiff.longtail.pipeline import prepare, run_experiment
    from pfdiff.report import render_report
    from pfdiff.runs import RunDir
    from pfdiff.training import set_verbosity

    if resume is not None and (config or set_):
        _fail("--resume uses the run's saved config.yaml; drop CONFIG and --set")
    if dry_run:
        if resume is not None:
            _fail(f"--dry-run plans a new run; for the plan of a resumed one: pfdiff check {resume / 'config.yaml'}")
        return _print_plan(config, set_)
    distributed.init_from_env()
    main = distributed.is_main()
    if not main:
        set_verbosity(0)  # one progress display: rank 0's
    try:
        scratch_dir = nullcontext() if main else tempfile.TemporaryDirectory(prefix=f"pfdiff-rank{distributed.rank()}-")
        with scratch_dir as scratch:  # None on rank 0
            if resume is not None:
                path = resume if main else Path(scratch) / "resume"
                distributed.mirror(resume, path)  # rank 0's run directory onto the others (no shared disk needed)
                run_dir = RunDir.open(path)
                cfg = run_dir.config()
                split = prepare(cfg)
                run_dir.tidy_for_resume()  # temporaries of the killed run gone, metrics.jsonl without repeats
            else:
                cfg = load_config(config, set_)
                split = prepare(cfg)  # refuses bad methods, data, devices and privacy plans before anything is written
                run_dir = RunDir.create(cfg, out if main else scratch)
            if main:
                console.print(f"run directory: [bold]{run_dir.path}[/]")
            if main and cfg.privacy.reproducible_noise and any(m.startswith("dp-") for m in cfg.methods):
                console.print("[bold red]NOT PRIVATE:[/] privacy.reproducible_noise derives the DP noise from the run "
                              "seed (debugging only); no ε printed for this run is a guarantee")
            results = run_experiment(cfg, run_dir, split)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    finally:
        distributed.finish()
    if not main:
        return
    report = render_report(run_dir)
    print_table(results)
    console.print(f"report: [bold]{report}[/]")


def _print_plan(config: Optional[str], set_: list[str]) -> None:
    from pfdiff.config import ConfigError, load_config
    from pfdiff.data import DataError
    from pfdiff.plan import make_plan, render_plan

    try:
        plan = make_plan(load_config(config, set_))
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(render_plan(plan))  # plain text: the plan holds [..] that rich would read as markup
    typer.echo("(the centralised `pfdiff run`; the federated run of this config: pfdiff fed CONFIG --dry-run)")


@app.command()
def check(config: Optional[str] = typer.Argument(None, help="preset name or YAML file (default: quickstart)"),
          set_: list[str] = typer.Option([], "--set", help="override, e.g. --set diffusion.steps=2000")):
    """The checks `pfdiff run` makes before writing anything, then its plan: data, stages and their steps per
    (split seed, seed) pair, every privacy release with its ε, a rough wall time. Writes nothing. The plan of
    the federated run of a config: `pfdiff fed CONFIG --dry-run`."""
    _print_plan(config, set_)


@app.command("config")
def config_(preset: Optional[str] = typer.Argument(None, help="preset name or YAML file (default: quickstart)"),
            set_: list[str] = typer.Option([], "--set", help="override, e.g. --set privacy.target_epsilon=1")):
    """Print the resolved config as YAML, every key with its comment; [set] marks values the preset or an
    override changed from the default (the output loads back as a config file)."""
    from pfdiff.config import ConfigError, annotated_config, load_config

    try:
        cfg = load_config(preset, set_)
    except ConfigError as e:
        _fail(str(e))
    typer.echo(annotated_config(cfg, preset or "quickstart"), nl=False)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory written by `pfdiff run`, or the root "
                                          "folder of `pfdiff fed` (its partitions' results.json)"),
           with_: list[Path] = typer.Option([], "--with", help="a `pfdiff fed` root of another configuration on the "
                                            "same encoder (repeatable): its methods join as <method>@<folder> in "
                                            "report-combined.md")):
    """Re-render report.md and the plots of a finished run, or of a `pfdiff fed` root (every partition and seed
    under it, e.g. after adding a seed's runs or with a newer pfdiff). With --with, one report over the variants
    of several `pfdiff fed` roots (the pick against CReFF made among all of them on the validation split)."""
    from pfdiff.federated import report as fed_report
    from pfdiff.report import render_report
    from pfdiff.runs import RunDir

    try:
        is_fed = not (run_dir / "config.yaml").exists() and fed_report.load_results(run_dir)
        if with_ and not is_fed:
            _fail(f"--with combines `pfdiff fed` roots; {run_dir} has no */results.json of one")
        if is_fed:
            console.print(f"report: [bold]{fed_report.render(run_dir, with_)}[/]")
            return
        run = RunDir.open(run_dir)
        if not run.results_path.exists():
            _fail(f"{run_dir} has no results.json yet; finish it with `pfdiff run --resume {run_dir}`")
        console.print(f"report: [bold]{render_report(run)}[/]")
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


@app.command("make-data")
def make_data(out: Path = typer.Argument(..., help="the .npz file to write"),
              samples: int = typer.Option(6000, help="number of examples"),
              classes: int = typer.Option(10, help="number of classes"),
              seed: int = typer.Option(0, help="generator seed"),
              class_sep: float = typer.Option(1.0, help="cluster separation (smaller is harder)")):
    """Write a synthetic feature dataset (scikit-learn make_classification) for `data.name=npz`."""
    from pfdiff.data import DataError, write_synthetic_npz

    try:
        path = write_synthetic_npz(out, samples, 64, classes, seed, class_sep)
    except DataError as e:
        _fail(str(e))
    console.print(f"wrote {path}; run it with: pfdiff run ablation --set data.name=npz --set data.path={path}")


@app.command()
def dpdm(config: Optional[str] = typer.Argument(None, help="preset name or YAML file whose `dpdm:` section is used"),
         set_: list[str] = typer.Option([], "--set", help="override, e.g. --set dpdm.steps=300 --set dpdm.lr=1e-3"),
         out: Path = typer.Option(Path("runs/dpdm"), help="output folder (config.yaml, results JSON, sample grids)"),
         epsilon: list[str] = typer.Option([], help="target ε per model ('inf' = non-private); default dpdm.epsilons"),
         seed: Optional[int] = typer.Option(None, help="default dpdm.seed"),
         steps: Optional[int] = typer.Option(None, help="training steps per model (default dpdm.steps)")):
    """Image-space reference: DPDM (DP-SGD U-Net on digits images) at each ε; feature-FID, CAS, grids."""
    from pfdiff.config import ConfigError, dump_config, load_config
    from pfdiff.imagespace import run_dpdm
    from pfdiff.runs import atomic_write_text

    overrides = list(set_)
    try:
        if epsilon:
            eps = [None if e in ("inf", "none") else float(e) for e in epsilon]
            overrides.append(f"dpdm.epsilons={[('null' if e is None else e) for e in eps]}".replace("'", ""))
    except ValueError:
        _fail(f"--epsilon takes numbers or 'inf', got {epsilon}")
    overrides += [f"dpdm.{k}={v}" for k, v in (("seed", seed), ("steps", steps)) if v is not None]
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))
    d = cfg.dpdm
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))  # the resolved config, saved with every run
    results = run_dpdm(out, tuple(d.epsilons), seed=d.seed, config=d)
    console.print_json(data={k: v for k, v in results.items() if k != "models"})
    console.print(f"results: [bold]{out / 'dpdm_results.json'}[/]")


@app.command()
def fed(config: Optional[str] = typer.Argument(None, help="preset name or YAML file (default: federated)"),
        set_: list[str] = typer.Option([], "--set", help="override, e.g. --set fed.rounds=5"),
        alpha: list[float] = typer.Option([], help="Dirichlet α to run (repeatable; 0 = IID); default fed.compare_alphas"),
        out: Optional[Path] = typer.Option(None, help="root folder (default: <output_dir>/<name>); re-running resumes"),
        dry_run: bool = typer.Option(False, "--dry-run", help="check every (α, seed) and print its plan (clients, "
                                     "rounds, bytes, DP noise); run and write nothing")):
    """Federated feature diffusion on Flower (Ray simulation): one run per α and seed (`seeds`), then report.md
    comparing FedAvg, FedDDPM, FedDDPM+ and the progressive pool (mean ± std over seeds)."""
    from pfdiff.config import ConfigError, load_config
    from pfdiff.federated.plan import fed_plan, render_fed_plan
    from pfdiff.federated.report import load_results, plot_rounds, write_report
    from pfdiff.federated.server_app import check_plan
    from pfdiff.federated.simulation import run_dir, run_overrides, simulate

    try:
        base = load_config(config or "federated", set_)
        root = out or Path(base.output_dir) / base.name
        # every (α, seed) validated (as a --set would be) and its plan checked before the first run starts
        configs = [(a, s, load_config(config or "federated", [*set_, *run_overrides(a, s)]))
                   for a in alpha or base.fed.compare_alphas for s in base.seeds]
        for _, _, cfg in configs:
            check_plan(cfg)
        if dry_run:
            typer.echo(f"plan of `pfdiff fed` for {base.name} (nothing run or written; the checks passed)")
            for a, s, cfg in configs:
                typer.echo(f"α = {a:g}, seed {s} → {run_dir(root, a, s, base.seeds)}")
                typer.echo("\n".join(render_fed_plan(fed_plan(cfg))))
            return
        for a, s, cfg in configs:
            console.print(f"α = {a:g}, seed {s} → [bold]{run_dir(root, a, s, base.seeds)}[/]")
            simulate(cfg, run_dir(root, a, s, base.seeds))
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        _fail(str(e))
    results = load_results(root)
    plot_rounds(root, results)
    console.print(f"report: [bold]{write_report(root, results)}[/]")


@app.command()
def deploy(config: Optional[str] = typer.Argument(None, help="preset name or YAML file (default: federated)"),
           set_: list[str] = typer.Option([], "--set", help="override, e.g. --set fed.rounds=5 (no spaces inside)"),
           nodes: Optional[int] = typer.Option(None, "--nodes", help="SuperNodes to start, one client partition each "
                                               "(sets fed.num_clients; default fed.num_clients)"),
           alpha: Optional[float] = typer.Option(None, help="Dirichlet α of the partition (0 = IID; default fed.alpha)"),
           out: Optional[Path] = typer.Option(None, help="root folder (default: <output_dir>/<name>-deploy): results "
                                              "in <iid|alpha-α>/ as with `pfdiff fed`, the deployment in deploy/"),
           app_dir: Optional[Path] = typer.Option(None, "--app", help="the Flower app to `flwr run` (default: this "
                                                  "pfdiff checkout)"),
           timeout: float = typer.Option(0, help="give up after this many seconds (0: no limit)")):
    """Run the federated app on a real local Flower deployment: a SuperLink and N SuperNodes on 127.0.0.1
    (insecure, free ports), `flwr run` with the config, the ServerApp's log streamed here; every process is
    stopped when the run ends, fails or on Ctrl-C. Exit code 0 when the run completed, 1 when it failed."""
    from pfdiff import training
    from pfdiff.config import ConfigError
    from pfdiff.federated.deploy import DeploymentError, deploy_request, run_app, terminate_as_interrupt
    from pfdiff.federated.report import load_results, plot_rounds, write_report
    from pfdiff.federated.simulation import FLOWER_NOISE

    try:
        req = deploy_request(config, list(set_), nodes, alpha, out, app_dir)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"α = {req.cfg.fed.alpha:g} → [bold]{req.run_dir}[/]; {req.cfg.fed.num_clients} SuperNodes")

    def echo(line: str) -> None:  # the ServerApp's log; -q: none, -v: every line, else without Flower's notices
        if training.verbosity() == 2 or (training.verbosity() == 1 and line.split(":", 1)[-1].strip()
                                        and not any(n in line for n in FLOWER_NOISE)):
            console.out(line, highlight=False)

    try:
        with terminate_as_interrupt():
            info = run_app(req.app_dir, req.root / "deploy", req.run_config, req.cfg.fed.num_clients,
                           timeout=timeout or float("inf"), echo=echo)
    except DeploymentError as e:
        errors.print(f"[bold red]error:[/] {str(e).splitlines()[0]} (logs in {req.root / 'deploy' / 'logs'})")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        errors.print(f"[bold red]interrupted:[/] every deployment process stopped; re-running resumes {req.run_dir}")
        raise typer.Exit(130)
    console.print(f"run {info.get('run-id', '')} {info['status']}")
    results = load_results(req.root)
    plot_rounds(req.root, results)
    console.print(f"report: [bold]{write_report(req.root, results)}[/]")


@app.command("runs")
def runs_(root: Optional[Path] = typer.Argument(None, help="folder of run directories, or one run / federated root "
                                                          "(default: output_dir of the default config, runs/)"),
          clean_failed: bool = typer.Option(False, "--clean-failed", help="remove the incomplete runs (killed or "
                                            "failed; of a federated root its incomplete partitions) and say which"),
          dry_run: bool = typer.Option(False, "--dry-run", help="with --clean-failed: only say what would go")):
    """List the run directories (`pfdiff run`, `dpdm`, `regimes`) and federated roots (`pfdiff fed`, `deploy`):
    created, status (finished: results written; running: written to in the last 10 minutes; incomplete:
    otherwise), methods and size on disk."""
    import time

    from rich.markup import escape

    from pfdiff.config import RunConfig
    from pfdiff.run_list import human_size, incomplete_paths, list_runs, remove_incomplete

    if dry_run and not clean_failed:
        _fail("--dry-run previews --clean-failed; add --clean-failed")
    root = root or Path(RunConfig.model_fields["output_dir"].default)
    try:
        entries = list_runs(root)
    except FileNotFoundError as e:
        _fail(str(e))
    colour = {"finished": "green", "running": "yellow", "incomplete": "red"}
    table = Table(title=f"runs in {escape(str(root))}")
    for col in ("name", "created", "status", "methods", "size"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for e in entries:
        status = f"[{colour[e.status]}]{e.status}[/]"
        if e.kind == "federated":  # its partitions, with their status where they differ
            mixed = len(set(e.partitions.values())) > 1
            status += " (" + ", ".join(f"{n} {s}" if mixed else n for n, s in e.partitions.items()) + ")"
        table.add_row(escape(e.name), time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)), status,
                      escape(", ".join(e.methods)), human_size(e.size))
    console.print(table)
    counts = {s: sum(e.status == s for e in entries) for s in colour}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(entries)}")
    if clean_failed:
        removed = remove_incomplete(entries, dry_run=dry_run)
        for p in removed:
            console.print(f"{'would remove' if dry_run else 'removed'} {escape(str(p))}")
        if not removed:
            console.print("nothing to remove")
    elif any(incomplete_paths(e) for e in entries):
        console.print("remove the incomplete ones with: pfdiff runs --clean-failed (preview: --dry-run)")


@app.command()
def attack(run_dir: Path = typer.Argument(..., help="a run directory written by `pfdiff run`"),
           attacks: list[str] = typer.Option(["loss", "secmi", "pia"], "--attack", help="loss | secmi | pia (repeatable)"),
           lira: int = typer.Option(0, help="LiRA with this many shadow denoisers (non-private LDMLR only; each costs one "
                                          "stage-2 training, ≈ 30 s for the quickstart)")):
    """Membership-inference attacks on every feature denoiser of a finished run (`pfdiff run`: added to its
    report; a federated run directory of `pfdiff fed`: attack.json and roc.png beside its results)."""
    from pfdiff.federated.attack import attack_fed_run
    from pfdiff.longtail.membership import attack_and_report

    try:
        if (run_dir / "scaler.safetensors").exists():  # a federated run (one α of `pfdiff fed`)
            report = attack_fed_run(run_dir, tuple(attacks))
        else:
            report = attack_and_report(run_dir, tuple(attacks), lira)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"written: [bold]{report}[/] (with attack.json and roc.png)")


@app.command()
def audit(config: Optional[str] = typer.Argument(None, help="preset name or YAML file (default: dp)"),
          set_: list[str] = typer.Option([], "--set", help="override, e.g. --set privacy.target_epsilon=1"),
          canaries: int = typer.Option(200, "--canaries", help="number of canaries m (each included w.p. 1/2)"),
          seed: int = typer.Option(0, help="seed of the canaries, their inclusion and the training"),
          out: Optional[Path] = typer.Option(None, help="folder for audit.json and the audit's privacy ledger"),
          timesteps: str = typer.Option("default", "--timesteps", help="t band of the canary scores: default "
                                        "(t < 0.2 T), all, or phase1 (t >= privacy.promise_S)"),
          phase1_paper: bool = typer.Option(False, "--phase1-paper", help="instead: distinguishing test (x vs -x) "
                                            "of dp-promise's Phase I as published, against the paper's claimed ε"),
          trials: int = typer.Option(4000, "--trials", help="--phase1-paper: test trials per side"),
          uses: int = typer.Option(1, "--uses", help="--phase1-paper: Phase-I steps per trial"),
          background: int = typer.Option(0, "--background", help="--phase1-paper: other examples in the batch")):
    """One-run privacy audit (Steinke, Nasr & Jagielski 2023) of the DP denoiser training: the claimed ε
    against an audited lower bound at 95 % confidence; or, with --phase1-paper, the distinguishing test of
    dp-promise's published Phase I. Exits with 1 when the lower bound exceeds the claim."""
    from pfdiff.config import ConfigError
    from pfdiff.longtail.private_audit import audit_config, run_audit

    try:
        r = run_audit(audit_config(config or "dp", set_), canaries, seed, out, timesteps=timesteps,
                      phase1_paper=phase1_paper,
                      phase1_options={"trials": trials, "uses": uses, "background": background})
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e))

    def _band(band) -> str:  # "[0, 0.2)" with the bracket escaped for rich
        return f"\\[{band[0]:g}, {band[1]:g})" if band else "?"

    if phase1_paper:
        console.print(f"claimed by the paper: ε = {r['epsilon_claimed']:.3f} for {r['steps']} Phase-I use(s) "
                      f"(μ_S = {r['mu_S']:.3f}, replace-one, PLD, δ = {r['delta']:g}); not a guarantee")
        console.print(f"distinguishing test x vs −x (replace-one, {r['background']} other rows): "
                      f"{r['false_positives']}/{r['trials']} false positives, {r['false_negatives']}/{r['trials']} "
                      f"false negatives; lower bound ε ≥ {r['epsilon_lower']:.3f} at {1 - r['beta']:.0%} confidence "
                      f"(add/remove: ε ≥ {r['epsilon_lower_add_remove']:.3f}; at most {r['epsilon_ceiling']:.2f} "
                      f"certifiable; separation {r['separation']:.1f} sd; {r['seconds']:.1f} s)")
    else:
        console.print(f"claimed ε = {r['epsilon_claimed']:.3f} (PLD, δ = {r['delta']:g}); audited lower bound ε ≥ "
                      f"{r['epsilon_lower']:.3f} at {1 - r['beta']:.0%} confidence ({r['correct']}/{r['guesses']} "
                      f"guesses right, k₊ = {r['k_plus']}, k₋ = {r['k_minus']}, {r['canaries']} canaries, scores on "
                      f"t/T ∈ {_band(r.get('score_t_range'))}; at most {r['epsilon_ceiling']:.2f} certifiable; "
                      f"{r['seconds']:.1f} s)")
    if out is not None:
        console.print(f"audit: [bold]{out / 'audit.json'}[/]")
    if r["epsilon_lower"] > r["epsilon_claimed"]:
        console.print("[bold red]VIOLATION:[/] the audited lower bound exceeds the claimed ε")
        raise typer.Exit(1)


@app.command()
def evidence(out: Path = typer.Option(Path("runs/evidence"), help="root folder; re-running resumes"),
             eps: list[float] = typer.Option([1.0, 10.0, float("inf")], "--eps", help="target ε (repeatable; inf = no DP)"),
             set_: list[str] = typer.Option([], "--set", help="override of the centralised dp preset"),
             fed_set: list[str] = typer.Option([], "--fed-set", help="override of the federated preset"),
             canaries: int = typer.Option(200, help="audit canaries per point (0: no audit)"),
             federated: bool = typer.Option(True, help="include the federated points")):
    """Privacy evidence sweep: claimed ε, audited lower bound, attack AUC / TPR@1%FPR and few-class accuracy,
    centralised and federated; writes evidence.md and privacy_utility.png."""
    from pfdiff.config import ConfigError
    from pfdiff.evidence import run_sweep

    try:
        path = run_sweep(out, list(eps), list(set_), list(fed_set), canaries, federated)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        _fail(str(e))
    console.print(f"evidence: [bold]{path}[/]")


@app.command()
def regimes(config: Optional[str] = typer.Argument(None, help="preset or YAML of the feature pipeline (default "
                                                               "quickstart); its `regimes:` section sizes the measurements"),
            set_: list[str] = typer.Option([], "--set", help="override: regimes.* sizes the measurements "
                                           "(e.g. regimes.grid_points=8), any other key the feature pipeline"),
            out: Path = typer.Option(Path("runs/regimes"), help="output folder (config.yaml, regimes.json, plots, regimes.md)"),
            data: str = typer.Option("digits", help="data source (digits, mnist, fmnist, cifar10, cifar100, npz)"),
            path: Optional[str] = typer.Option(None, help="path of a user-supplied data source"),
            run_dir: Optional[Path] = typer.Option(None, help="reuse the stage-1 encoder and LDMLR denoiser of a run"),
            what: list[str] = typer.Option(["features", "images"], "--what", help="features | images (repeatable)"),
            seed: Optional[int] = typer.Option(None, help="default regimes.seed"),
            threads: Optional[int] = typer.Option(None, help="torch CPU threads (1 is fastest for digits)"),
            feature_steps: Optional[int] = typer.Option(None, help="feature denoiser steps without --run-dir "
                                                        "(default regimes.feature_steps)"),
            image_steps: Optional[int] = typer.Option(None, help="U-Net steps (default regimes.image_steps)"),
            max_train: Optional[int] = typer.Option(None, help="subsample large image sets to this many examples"),
            sweep_n: list[int] = typer.Option([], "--sweep-n", help="members per class of the collapse-vs-n sweep "
                                              "(repeatable; 0 = no sweep; default regimes.sweep_n)")):
    """Dynamical regimes of diffusion (Biroli et al. 2024): speciation t_S and collapse t_C, theory vs cloning
    and collapse measurements, dp-promise's S, few-step DDIM around t_S, collapse vs membership AUC."""
    from pfdiff.analysis.regimes_run import run_regimes
    from pfdiff.config import ConfigError, dump_config, load_config
    from pfdiff.data import DataError
    from pfdiff.runs import atomic_write_text

    options = {"seed": seed, "feature_steps": feature_steps, "image_steps": image_steps, "max_train": max_train,
               "sweep_n": tuple(n for n in sweep_n if n > 0) if sweep_n else None}
    try:
        cfg = load_config(config, set_)  # validates every key (regimes.* and the pipeline's) before any work
        pipeline = tuple(s for s in set_ if not s.strip().startswith("regimes."))
        rc = cfg.regimes.model_validate({**cfg.regimes.model_dump(), "preset": config or "quickstart",
                                         "overrides": pipeline, **{k: v for k, v in options.items() if v is not None}})
        cfg = cfg.model_copy(update={"regimes": rc})
        unknown = set(what) - {"features", "images"}
        if unknown:
            raise ValueError(f"unknown analyses {sorted(unknown)}; choose from features, images")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
        run_regimes(out, tuple(what), data, path, run_dir, config=rc, threads=threads)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"regimes: [bold]{out / 'regimes.md'}[/] (regimes.json, regimes_*.png)")


@app.command()
def presets():
    """List the built-in config presets."""
    from pfdiff.config import PRESET_DIR, list_presets

    for name in list_presets():
        console.print(f"{name}: {PRESET_DIR / (name + '.yaml')}")


def print_table(results: dict) -> None:
    from pfdiff.evaluation import GROUPS
    from pfdiff.report import mean_spread, n_runs

    cols = ("top1", *GROUPS, "balanced")  # balanced beside few, as in report.md
    proto = results.get("protocol") or {}
    over = (f"split seeds {proto['split_seeds']} × seeds {proto['seeds']}" if proto.get("split_seeds")
            else f"seeds {results['seeds']}")
    n = n_runs(results)
    table = Table(title=f"test accuracy, mean ± std over {over}" + (": ± n/a (1 seed)" if n < 2 else ""))
    table.add_column("method")
    for c in cols:
        table.add_column(c, justify="right")
    for method, row in results["methods"].items():
        table.add_row(method, *(mean_spread(row[c], n, why=False) for c in cols))
    # in a log file rich would wrap at 80 columns (its width without a terminal; print(width=) only narrows):
    # one row per line instead
    width = console.width
    if not console.is_terminal:
        console.width = max(width, LOG_WIDTH)
    try:
        console.print(table)
    finally:
        console.width = width


if __name__ == "__main__":
    app()
