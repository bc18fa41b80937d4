"""Ray Tune sweeps over any config key, scored by FID:

    gendist sweep --config configs/sweeps/wgan_gp_celeba64.yaml [sweep.num_samples=32 ...] [--resume]

Each trial runs the ordinary training entry point (`python -m gendist.train`, or `torchrun
--nproc_per_node N -m gendist.train` for a data-parallel trial) in its own run folder, with the
sampled values as config overrides: there is no second training loop. The trial reports every
evaluation row the run writes (eval.jsonl) to Tune together with the training checkpoint of that
step, which is what ASHA stops on, PBT copies between trials, and a restored sweep resumes from.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gendist import ray_cluster
from gendist.checkpoint import checkpoint_root, checkpoint_step, latest_checkpoint
from gendist.config import ConfigError, load_config, load_into, parse_args_with_overrides, to_yaml
from gendist.progress import drop_rows_after

FINAL_WRITES_S = 300  # how long a trial's last report waits for its training's final writes
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


@dataclass
class SweepSettings:
    name: str = "sweep"  # experiment folder under storage_path
    storage_path: str = "runs/sweeps"
    num_samples: int = 8  # sampled configurations (each grid point is sampled this many times)
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    metric: Literal["fid", "kid"] = "fid"
    grace_period: int = 1  # asha: evaluations a trial gets before it may be stopped
    reduction_factor: int = 3  # asha: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = 1  # pbt: evaluations between exploit/explore steps
    workers_per_trial: int = 1  # ranks of one trial, data-parallel on one node
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources allow
    max_failures: int = 1  # retries of a failing trial; a retry resumes from its last checkpoint
    # Ray dashboard of a local Ray, on 127.0.0.1:8265 with token authentication (slurm/sweep.sbatch: DASHBOARD=0|1)
    dashboard: bool = True


@dataclass
class SweepConfig:
    base: str = ""  # the experiment config every trial starts from
    overrides: list[str] = field(default_factory=list)  # fixed for every trial, e.g. train.steps=5000
    # config key -> {loguniform: [lo, hi]} | {uniform: [lo, hi]} | {randint: [lo, hi]} | {choice: [...]} | {grid: [...]}
    space: dict[str, Any] = field(default_factory=dict)
    sweep: SweepSettings = field(default_factory=SweepSettings)


@dataclass(frozen=True)
class TrialPlan:
    """What every trial shares; passed with tune.with_parameters, so it is not a hyperparameter."""

    base: str
    overrides: tuple[str, ...]
    workdir: str
    workers: int


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """The sweep file, checked: the base config resolves and every search key is a config key."""
    sweep = load_into(SweepConfig(), path, overrides)
    if not sweep.base:
        raise ConfigError(f"{path}: 'base' must name the experiment config the trials start from")
    base = Path(sweep.base)
    if not base.is_file() and (Path(path).parent / base).is_file():
        base = Path(path).parent / base
    sweep.base = str(base.resolve())
    cfg = load_config(sweep.base, sweep.overrides)
    if cfg.eval.every < 1:
        raise ConfigError("trials are scored by FID: set eval.every in the base config or the sweep's overrides")
    scored_otherwise = {
        "pix2pix": "its inpainting metrics (PSNR, SSIM, L1 in the hole)",
        "cyclegan": "the FID of its translations and its cycle error",
        "classifier": "its held-out attribute accuracy and balanced accuracy against the majority baseline",
    }
    if cfg.model.name in scored_otherwise:
        raise ConfigError(
            f"trials are scored by the FID of generated samples; {cfg.model.name} is scored by "
            f"{scored_otherwise[cfg.model.name]}, which sweeps do not rank by yet"
        )
    if not sweep.space:
        raise ConfigError(f"{path}: 'space' is empty; give at least one config key to search")
    for key, spec in sweep.space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(
                f"space.{key}: give exactly one of {', '.join(DISTRIBUTIONS)}, e.g. {{loguniform: [1e-5, 1e-3]}}"
            )
        kind, args = next(iter(spec.items()))
        example = args[0] if isinstance(args, list) and args else args
        load_config(sweep.base, [*sweep.overrides, f"{key}={json.dumps(example)}"])  # a bad key fails here, named
        if kind in ("loguniform", "uniform", "randint") and (not isinstance(args, list) or len(args) != 2):
            raise ConfigError(f"space.{key}.{kind} takes [low, high], got {args!r}")
    if sweep.sweep.scheduler == "pbt" and any("grid" in spec for spec in sweep.space.values()):
        raise ConfigError("pbt mutates sampled values; use choice instead of grid with sweep.scheduler=pbt")
    return sweep


def search_space(space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    builders = {
        "loguniform": lambda a: tune.loguniform(float(a[0]), float(a[1])),
        "uniform": lambda a: tune.uniform(float(a[0]), float(a[1])),
        "randint": lambda a: tune.randint(int(a[0]), int(a[1])),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {key: builders[kind](args) for key, spec in space.items() for kind, args in spec.items()}


def _die_with_parent() -> None:
    """The trial's training processes end when Tune kills the trial actor (ASHA stop, PBT exploit)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _install_checkpoint(source: Path, run_dir: Path) -> int:
    """Make `source` (a training checkpoint Tune handed back) the run's only one; returns its step."""
    step = json.loads((source / "step.json").read_text())["step"]
    root = checkpoint_root(run_dir)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    shutil.copytree(source, root / f"step_{step:07d}", ignore=shutil.ignore_patterns("step.json"))
    return step


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune trainable: train with the sampled overrides, report each evaluation and its checkpoint."""
    from ray import tune

    trial_dir = Path(tune.get_context().get_trial_dir())
    run_dir = trial_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    restored = tune.get_checkpoint()
    start_step = 0
    if restored is not None:
        with restored.as_directory() as folder:
            start_step = _install_checkpoint(Path(folder), run_dir)
    overrides = [
        *plan.overrides,
        *(f"{key}={json.dumps(value)}" for key, value in config.items()),
        f"train.run_dir={run_dir}",
    ]
    cfg = load_config(plan.base, overrides)  # a bad combination fails the trial here, recorded by Tune
    with (trial_dir / "launches.log").open("a") as launches:
        launches.write(json.dumps({"time": time.time(), "from_step": start_step}) + "\n")
    if plan.workers > 1:
        launcher = [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            str(plan.workers),
        ]
    else:
        launcher = [sys.executable]
    eval_log = run_dir / "eval.jsonl"
    # Rows after the installed checkpoint (a killed attempt's, or this trial's own before PBT handed
    # it another's checkpoint) are replayed by the trainer: none of them is reported.
    drop_rows_after(eval_log, start_step, lambda row: row.get("source") == "training")
    drop_rows_after(run_dir / "metrics.jsonl", start_step)
    reported = start_step
    with (trial_dir / "train.log").open("a") as log:
        proc = subprocess.Popen(
            [*launcher, "-m", "gendist.train", "--config", plan.base, *overrides],
            cwd=plan.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        try:
            while True:
                finished = proc.poll() is not None
                reported = _report_new_rows(eval_log, reported, run_dir, plan.workers, proc, cfg.train.steps)
                if finished:
                    break
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    if proc.returncode != 0:
        tail = (trial_dir / "train.log").read_text().splitlines()[-25:]
        raise RuntimeError(
            f"training exited with {proc.returncode}; last lines of {trial_dir / 'train.log'}:\n" + "\n".join(tail)
        )
    latest = latest_checkpoint(run_dir)
    reached = checkpoint_step(latest) if latest is not None else 0
    if reached < cfg.train.steps:  # a stop signal from outside Tune (e.g. SLURM's SIGTERM to every process)
        raise RuntimeError(
            f"training stopped at step {reached} of {cfg.train.steps} on a signal; "
            "the trial is retried from its last reported checkpoint"
        )


def _report_new_rows(
    eval_log: Path, reported: int, run_dir: Path, ranks: int, proc: subprocess.Popen, last_step: int
) -> int:
    """Report the training's evaluation rows of steps after `reported`, each with its step's
    checkpoint; returns the last step reported. The last step's row waits for the training to end:
    Tune may stop the trial at that report, and the run's final writes (its TensorBoard hparams with
    the final metrics) must be done by then."""
    from ray import tune

    text = eval_log.read_text() if eval_log.is_file() else ""
    for line in text[: text.rfind("\n") + 1].splitlines():
        row = json.loads(line)
        if row.get("source") != "training" or row["step"] <= reported:
            continue
        folder = checkpoint_root(run_dir) / f"step_{row['step']:07d}"
        while not (folder / "state.pt").is_file() and proc.poll() is None:  # saved right after the evaluation
            time.sleep(0.2)
        if row["step"] >= last_step:
            with contextlib.suppress(subprocess.TimeoutExpired):  # a hung trainer must not hang the trial
                proc.wait(timeout=FINAL_WRITES_S)
        metrics = {
            "fid": row["fid"],
            "kid": row["kid"],
            "step": row["step"],
            "images_seen": row["images_seen"],
            "fid_samples": row["protocol"]["generated"],
            "inception": row["protocol"]["inception"],
            "ranks": ranks,
        }
        if (folder / "state.pt").is_file():
            (folder / "step.json").write_text(json.dumps({"step": row["step"]}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))
        else:
            tune.report(metrics)
        reported = row["step"]
    return reported


def build_tuner(sweep: SweepConfig, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    settings = sweep.sweep
    cfg = load_config(sweep.base, sweep.overrides)
    evaluations = -(-cfg.train.steps // cfg.eval.every)
    plan = TrialPlan(
        sweep.base,
        (*sweep.overrides, f"train.checkpoint_every={cfg.eval.every}"),
        os.getcwd(),
        settings.workers_per_trial,
    )
    resources = {
        "cpu": settings.workers_per_trial * settings.cpus_per_worker,
        "gpu": settings.workers_per_trial * settings.gpus_per_worker,
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), resources)
    experiment = experiment_folder(sweep)
    storage = str(experiment.parent)
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise FileNotFoundError(f"no sweep to resume at {experiment}")
        return tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True), experiment
    if settings.scheduler == "asha":
        scheduler = ASHAScheduler(
            max_t=evaluations, grace_period=settings.grace_period, reduction_factor=settings.reduction_factor
        )
    elif settings.scheduler == "pbt":
        scheduler = PopulationBasedTraining(
            perturbation_interval=settings.perturbation_interval, hyperparam_mutations=search_space(sweep.space)
        )
    else:
        scheduler = FIFOScheduler()
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(sweep.space),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode="min",
            scheduler=scheduler,
            num_samples=settings.num_samples,
            max_concurrent_trials=settings.max_concurrent_trials or None,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=storage,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            # PBT clones other trials' checkpoints: keep more of them
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if settings.scheduler == "pbt" else 2),
        ),
    )
    return tuner, experiment


def experiment_folder(sweep: SweepConfig) -> Path:
    """The sweep's folder: Tune's results and every trial's run folder (TensorBoard's logdir)."""
    return Path(sweep.sweep.storage_path).resolve() / sweep.sweep.name


def summarise(sweep: SweepConfig, results, experiment: Path) -> Path | None:
    """trials.csv for every trial, and best_config.yaml: the base config with the best values."""
    metric = sweep.sweep.metric
    rows = []
    for result in results:
        rows.append(
            {
                "trial": Path(result.path).name,
                **result.config,
                metric: (result.metrics or {}).get(metric),
                "step": (result.metrics or {}).get("step"),
                "ranks": (result.metrics or {}).get("ranks", sweep.sweep.workers_per_trial),
                "error": str(result.error).splitlines()[0] if result.error else "",
            }
        )
    with (experiment / "trials.csv").open("w", newline="") as sink:
        writer = csv.DictWriter(sink, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(
            {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()} for row in rows
        )
    scored = [result for result in results if result.metrics and result.metrics.get(metric) is not None]
    if not scored:
        return None
    best = min(scored, key=lambda result: result.metrics[metric])
    cfg = load_config(sweep.base, [*sweep.overrides, *(f"{k}={json.dumps(v)}" for k, v in best.config.items())])
    cfg.train.run_dir = f"runs/{sweep.sweep.name}_best"
    header = (
        f"# Best of sweep {sweep.sweep.name}: {metric} {best.metrics[metric]:.4f} at step {best.metrics['step']} "
        f"({best.metrics['fid_samples']} samples, Inception {best.metrics['inception']}), trial "
        f"{Path(best.path).name}.\n# Values found: {json.dumps(best.config)}\n"
    )
    path = experiment / "best_config.yaml"
    path.write_text(header + to_yaml(cfg))
    return path


def run_sweep(args: argparse.Namespace) -> int:
    import ray

    sweep = load_sweep(args.config, args.overrides)
    address = args.address or os.environ.get("RAY_ADDRESS")
    started = time.perf_counter()
    # Without an address a new local Ray starts here ("local": never a cluster that `ray start` left
    # on this machine), with token authentication and its dashboard on 127.0.0.1 only (ray_cluster).
    try:
        if address:
            context, notes = ray_cluster.join(address), []
        else:
            context, notes = ray_cluster.start_local(sweep.sweep.dashboard)
    except ray_cluster.RayAuthError as err:
        print(f"gendist: error: {err}", file=sys.stderr, flush=True)
        return 2
    for note in notes:
        print(note, flush=True)
    print(
        f"ray {'connected to ' + address if address else 'started locally'} in {time.perf_counter() - started:.1f} s; "
        f"resources: {ray.cluster_resources()}",
        flush=True,
    )
    if not address and context.dashboard_url:
        print("\n".join(ray_cluster.dashboard_lines(context.dashboard_url)), flush=True)
    print(f"TensorBoard, every trial side by side: tensorboard --logdir {experiment_folder(sweep)}", flush=True)
    try:
        tuner, experiment = build_tuner(sweep, args.resume)
        results = tuner.fit()
        best = summarise(sweep, results, experiment)
    finally:
        ray.shutdown()
    errors = sum(1 for result in results if result.error)
    print(f"sweep {experiment}: {len(results)} trials, {errors} failed; trials.csv written")
    print(f"best config: {best}" if best else "no trial reported a score")
    return 0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="sweep YAML (see configs/sweeps/)")
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept)"
    )
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. sweep.num_samples=32 overrides=[...]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gendist.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_sweep_arguments(parser)
    return run_sweep(parse_args_with_overrides(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
