"""`gendist compare`: runs side by side in one Markdown report with PNG figures.

Reads only what runs leave behind (config.yaml, metrics.jsonl, eval.jsonl, the latest checkpoint's
counters, sample grids). FIDs measured under different protocols (reference set, sample count,
Inception weights) are flagged instead of being silently ranked together.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from gendist import families
from gendist.checkpoint import latest_checkpoint, safe_load
from gendist.config import RunConfig, load_config
from gendist.eval.evaluator import read_rows
from gendist.families.base import FamilyInputs
from gendist.progress import read_jsonl
from gendist.trained import trained_attribute_names

LOSS_KEYS = ("loss_d", "loss_g", "wasserstein", "gradient_penalty", "loss", "recon", "kl")


@dataclass
class RunSummary:
    name: str
    path: Path
    cfg: RunConfig
    metrics: list[dict]
    evals: list[dict]
    counters: dict = field(default_factory=dict)

    @property
    def latest_eval(self) -> dict | None:
        scored = [row for row in self.evals if "fid" in row]
        return max(reversed(scored), key=lambda row: row["step"]) if scored else None  # the last of the latest step

    def protocol_key(self) -> tuple | None:
        row = self.latest_eval
        if row is None:
            return None
        p = row["protocol"]
        return p["reference_key"], p["generated"], p["inception"]


def load_run(path: Path, name: str) -> RunSummary:
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a gendist run folder (no config.yaml)")
    metrics = read_jsonl(path / "metrics.jsonl")
    summary = RunSummary(name, path, load_config(path / "config.yaml"), metrics, read_rows(path))
    checkpoint = latest_checkpoint(path)
    if checkpoint is not None:
        summary.counters = safe_load(checkpoint / "state.pt")["train_state"]
    elif metrics:
        last = metrics[-1]
        summary.counters = {"step": last["step"], "images_seen": last.get("images_seen", 0), "train_seconds": 0.0}
    return summary


def parameter_counts(run: RunSummary) -> str:
    """Parameters per network, e.g. `generator 3.58M / discriminator 2.77M`."""
    family = families.declare(FamilyInputs(run.cfg, trained_attribute_names(run.path, run.cfg)))
    return " / ".join(
        f"{network.name} {sum(p.numel() for p in network.module.parameters()) / 1e6:.2f}M"
        for network in family.networks
    )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds else "n/a"


def table(runs: list[RunSummary]) -> list[str]:
    keys = {run.protocol_key() for run in runs if run.protocol_key() is not None}
    marks = {key: "*" * (i + 1) for i, key in enumerate(sorted(keys))} if len(keys) > 1 else {}
    lines = [
        "| run | model | FID | KID x 1e3 | recon MSE | steps | images seen | train time | images/s | parameters |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        row, counters = run.latest_eval, run.counters
        seconds = counters.get("train_seconds", 0.0)
        fid = f"{row['fid']:.2f}{marks.get(run.protocol_key(), '')} (step {row['step']})" if row else "not evaluated"
        kid = f"{row['kid'] * 1e3:.2f} ± {row['kid_std'] * 1e3:.2f}" if row else "-"
        recon = f"{row['recon_mse']:.5f}" if row and "recon_mse" in row else "-"
        speed = f"{counters.get('images_seen', 0) / seconds:.1f}" if seconds else "n/a"
        lines.append(
            f"| {run.name} | {run.cfg.model.name} | {fid} | {kid} | {recon} | {counters.get('step', 0)} | "
            f"{counters.get('images_seen', 0):,} | {_minutes(seconds)} | {speed} | {parameter_counts(run)} |"
        )
    if marks:
        lines.append("")
        lines.append(
            "**FIDs marked with different numbers of \\* were measured under different protocols and are not "
            "comparable:**"
        )
        for key, mark in marks.items():
            lines.append(f"- {mark}: reference {key[0]}, {key[1]} generated images, Inception {key[2]}")
    return lines


def _pair(row: dict, first: str, second: str) -> str | None:
    if row.get(first) is None:
        return None
    return f"{row[first]:.3f} / {row[second]:.3f}"


def _with_baselines(row: dict, key: str, *baselines: str) -> str | None:
    if row.get(key) is None:
        return None
    return f"{row[key]:.3f} (" + " / ".join(f"{row[b]:.3f}" for b in baselines) + ")"


def _directions(row: dict, prefix: str, baseline: str = "") -> str | None:
    """Each translation direction's `prefix` score (and its `baseline` suffix), e.g. `A→B 0.62 (0.05)`."""
    cells = [
        f"{key.removeprefix(prefix).replace('_to_', '→')} {value:.3f}"
        + (f" ({row[key + baseline]:.3f})" if baseline else "")
        for key, value in row.items()
        if key.startswith(prefix) and isinstance(value, float) and not key.endswith(("_identity", "_skipped"))
    ]
    return "; ".join(cells) or None


# the scores beside FID, each with its in-run baseline: (column, cell of the latest evaluation row)
OTHER_SCORES = [
    ("precision / recall (FID features)", lambda r: _pair(r, "precision", "recall")),
    (
        "FID / KID x 1e3 of codes from the fitted Gaussian (ex-post density)",
        lambda r: None if r.get("fid_fitted") is None else f"{r['fid_fitted']:.2f} / {r['kid_fitted'] * 1e3:.2f}",
    ),
    ("FD_face †", lambda r: None if r.get("fd_face") is None else f"{r['fd_face']:.4g}"),
    ("precision / recall (face features †)", lambda r: _pair(r, "precision_face", "recall_face")),
    (
        "asked attributes judged present (real / shuffled labels)",
        lambda r: _with_baselines(
            r, "cond_attr_mean_accuracy", "cond_attr_mean_accuracy_real", "cond_attr_mean_accuracy_shuffled"
        ),
    ),
    ("translations judged in the target (untranslated)", lambda r: _directions(r, "flip_rate_", "_identity")),
    ("other attributes kept", lambda r: _directions(r, "kept_")),
    ("cycle L1", lambda r: _directions(r, "cycle_l1_")),
    ("inpainting PSNR (Telea / mean fill)", lambda r: _with_baselines(r, "psnr_model", "psnr_telea", "psnr_mean_fill")),
    ("super-resolution PSNR Y (bicubic)", lambda r: _with_baselines(r, "psnr_y_model", "psnr_y_bicubic")),
    ("super-resolution SSIM Y (bicubic)", lambda r: _with_baselines(r, "ssim_y_model", "ssim_y_bicubic")),
    ("super-resolution FID (bicubic)", lambda r: _with_baselines(r, "sr_model_fid", "sr_bicubic_fid")),
    (
        "attribute accuracy (majority) / balanced (majority)",
        lambda r: (
            None
            if r.get("attr_mean_accuracy") is None
            else f"{r['attr_mean_accuracy']:.3f} ({r['attr_mean_accuracy_majority']:.3f}) / "
            f"{r['attr_mean_balanced_accuracy']:.3f} ({r['attr_mean_balanced_accuracy_majority']:.3f})"
        ),
    ),
]


def other_scores(runs: list[RunSummary]) -> list[str]:
    """A table of the latest evaluation's scores beside FID, the columns some run has; [] if none."""
    latest = {run.name: max(run.evals, key=lambda row: row["step"]) if run.evals else {} for run in runs}
    cells = {run.name: [cell(latest[run.name]) for _, cell in OTHER_SCORES] for run in runs}
    shown = [i for i in range(len(OTHER_SCORES)) if any(cells[run.name][i] for run in runs)]
    if not shown:
        return []
    lines = [
        "| run | " + " | ".join(OTHER_SCORES[i][0] for i in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for run in runs:
        lines.append(f"| {run.name} | " + " | ".join(cells[run.name][i] or "-" for i in shown) + " |")
    judges = {json.dumps(row["judge"], sort_keys=True) for row in latest.values() if "judge" in row}
    if judges:
        lines += [
            "",
            "† in the features of gendist's own face classifier (eval.classifier): not comparable with FID "
            "or any published number. Judge" + ("s" if len(judges) > 1 else "") + ":",
        ]
        lines += [
            f"- `{json.loads(j)['run']}` ({json.loads(j)['network']}, step {json.loads(j)['step']})" for j in judges
        ]
    return lines


def plot_losses(runs: list[RunSummary], out: Path) -> None:
    fig = Figure(figsize=(4.5 * len(runs), 3.4))
    axes = fig.subplots(1, len(runs), squeeze=False)
    for ax, run in zip(axes[0], runs):
        steps = [row["step"] for row in run.metrics]
        for key in LOSS_KEYS:
            if any(key in row for row in run.metrics):
                ax.plot(steps, [row.get(key, float("nan")) for row in run.metrics], label=key)
        ax.set_title(f"{run.name} ({run.cfg.model.name})")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_fid(runs: list[RunSummary], out: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for run in runs:
        rows = sorted((row for row in run.evals if "fid" in row), key=lambda row: row["step"])
        if rows:
            ax.plot(
                [row.get("images_seen", 0) for row in rows], [row["fid"] for row in rows], marker="o", label=run.name
            )
    ax.set_xlabel("real images seen")
    ax.set_ylabel("FID")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def latest_grid(run: RunSummary) -> Path | None:
    grids = sorted((run.path / "samples").glob("step_*.png"))
    return grids[-1] if grids else None


def plot_grids(runs: list[RunSummary], out: Path) -> None:
    fig = Figure(figsize=(4 * len(runs), 4.3))
    axes = fig.subplots(1, len(runs), squeeze=False)
    for ax, run in zip(axes[0], runs):
        grid = latest_grid(run)
        if grid is not None:
            ax.imshow(Image.open(grid).convert("RGB"))
            ax.set_title(f"{run.name}, {grid.stem.replace('_', ' ')}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def unique_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        name = path.resolve().name
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def write_report(run_dirs: list[str | Path], out_dir: str | Path, title: str = "gendist comparison") -> Path:
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(path, name) for path, name in zip(paths, unique_names(paths))]
    out = Path(out_dir)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    plot_losses(runs, out / "losses.png")
    plot_fid(runs, out / "fid.png")
    plot_grids(runs, out / "samples.png")
    lines = [f"# {title}", "", *table(runs), ""]
    scores = other_scores(runs)
    if scores:
        lines += ["## Beside FID (latest evaluation of each run)", "", *scores, ""]
    protocols = {json.dumps(run.latest_eval["protocol"], sort_keys=True): run.name for run in runs if run.latest_eval}
    if protocols:
        lines += ["FID/KID protocol" + (" (all runs)" if len(protocols) == 1 else "s") + ":", ""]
        for text in protocols:
            p = json.loads(text)
            lines.append(
                f"- {p['fid']}; Inception: {p['inception']}; {p['generated']} generated images "
                f"({p['generator']}) against {p['reference_images']} '{p['reference_split']}' images of "
                f"`{p['shards']}` (stats {p['reference_key']}, preprocessing {p['preprocessing']['size']}px, "
                f"crop {p['preprocessing']['crop_fraction']:.4f}); KID: {p['kid']['subsets']} subsets of "
                f"{p['kid']['subset_size']}, kernel {p['kid']['kernel']}."
            )
        lines.append("")
    lines += [
        "## Losses",
        "",
        "![losses](losses.png)",
        "",
        "## FID over training",
        "",
        "![FID](fid.png)",
        "",
        "## Samples (latest grid of each run)",
        "",
        "![samples](samples.png)",
        "",
        "| " + " | ".join(run.name for run in runs) + " |",
        "|" + "---|" * len(runs),
    ]
    cells = []
    for run in runs:
        grid = latest_grid(run)
        if grid is None:
            cells.append("no grid")
            continue
        shutil.copyfile(grid, out / "grids" / f"{run.name}.png")
        cells.append(f"![{run.name}](grids/{run.name}.png)")
    lines.append("| " + " | ".join(cells) + " |")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
