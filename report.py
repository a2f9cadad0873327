"""Turn a folder of finished btvae.py runs into the paper's tables and figures. Trains nothing.

    python report.py results            # reads results/runs/*, writes into results/

Writes, beside the runs:
  table1.md, table1.csv    Table 1: FID (mean and standard deviation over seeds), precision, recall and
                           epochs trained per data set and lambda2, the paper's value beside ours, and
                           whether each BTVAE setting beats the VAE by more than the spread between seeds
  figure2_<dataset>.png    Figure 2: 144 samples of the VAE beside those of the best BTVAE (by mean FID)
  figure3.png              Figure 3: MNIST test images' posterior means under 2-d VAE and BTVAE, by digit
  table2_<dataset>/        Table 2's material: the two grids as A and B in a random order, with the paper's
                           question in index.html; the key is table2_<dataset>_key.json, kept apart

run_all.sh calls this after its runs; it kept separate from btvae.py so that file stays about the method.
"""

import argparse
import csv
import html
import json
import math
import random
import re
import shutil
import statistics
import textwrap
from pathlib import Path

import torch

import btvae

# Table 1 of the paper: FID-64 (their code: 500 samples, the uint8 conversion bug; see README).
PAPER_TABLE1 = {
    0.0: {"mnist": 0.0187, "cifar10": 0.3465, "celeba": 1.173},
    0.00025: {"mnist": 0.0482, "cifar10": 0.3478, "celeba": 1.137},
    0.0025: {"mnist": 0.1984, "cifar10": 0.3194, "celeba": 1.107},
    0.025: {"mnist": 0.03245, "cifar10": 0.2838, "celeba": 1.028},
    0.25: {"mnist": 0.03286, "cifar10": 0.2235, "celeba": 0.9283},
    -0.00025: {"mnist": 0.01939, "cifar10": 0.3394, "celeba": 1.089},
}
DATASET_ORDER = ("mnist", "cifar10", "celeba", "folder")
TABLE2_QUESTION = (
    "Please rank the two groups of sample images in terms of diversity. Diversity includes image attributes such as "
    "background and lighting, and face attributes such as alleged skin color, gender, hair style, and shape. Rank the "
    "more diverse group 1 and the other 2. If you think the two groups are equally diverse, rank both 1.5.")


RUN_NAME = re.compile(r"^(?P<dataset>[a-z0-9]+)_lam2=(?P<lam2>[^_]+)_seed(?P<seed>\d+)$")  # run_all.sh's names


def read_runs(runs_dir):
    """Every run folder: its settings, and its metrics or why it has none.

    A run that failed on bad input wrote no config.json; its settings come from
    the folder name run_all.sh gave it.
    """
    runs = []
    for folder in sorted(p for p in Path(runs_dir).glob("*") if p.is_dir()):
        if (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
        elif RUN_NAME.match(folder.name):
            config = {**RUN_NAME.match(folder.name).groupdict(), "latent_dim": None}
        else:
            continue
        lam2 = float(config["lam2"])
        run = {"folder": folder, "dataset": config["dataset"], "lam2": lam2, "setting": f"{lam2:g}",
               "seed": int(config["seed"]), "latent_dim": config["latent_dim"], "metrics": None, "failure": None}
        if (folder / "metrics.json").is_file():
            run["metrics"] = json.loads((folder / "metrics.json").read_text())
        elif (folder / "FAILED").is_file():
            run["failure"] = (folder / "FAILED").read_text().strip() or "failed"
        else:
            run["failure"] = "unfinished (interrupted, or still running)"
        runs.append(run)
    return runs


def setting_order(run):
    """Data sets in the paper's order; the VAE first, then lambda2 ascending (anything not a number last)."""
    lam2 = run["lam2"] if math.isfinite(run["lam2"]) else math.inf
    return DATASET_ORDER.index(run["dataset"]) if run["dataset"] in DATASET_ORDER else len(DATASET_ORDER), lam2 != 0, lam2


def mean_and_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs):
    """One row per (data set, lambda2) of the Table 1 runs (latent dimension as configured, not Figure 3's)."""
    groups = {}
    for run in runs:
        if not run["folder"].name.startswith("figure3_"):
            groups.setdefault((run["dataset"], run["setting"]), []).append(run)
    rows = []
    for (dataset, _), group in sorted(groups.items(), key=lambda kv: setting_order(kv[1][0])):
        lam2 = group[0]["lam2"]
        finished = [r["metrics"] for r in group if r["metrics"] is not None]
        fid_mean, fid_std = mean_and_spread([m["fid"] for m in finished])
        rows.append({
            "dataset": dataset, "lam2": lam2, "model": "VAE" if lam2 == 0 else "BTVAE",
            "seeds": ",".join(str(r["seed"]) for r in sorted(group, key=lambda r: r["seed"]) if r["metrics"]),
            "fid_mean": fid_mean, "fid_std": fid_std,
            "precision_mean": mean_and_spread([m.get("precision") for m in finished])[0],
            "recall_mean": mean_and_spread([m.get("recall") for m in finished])[0],
            "epochs_mean": mean_and_spread([m["epochs_trained"] for m in finished])[0],
            "paper_fid": PAPER_TABLE1.get(lam2, {}).get(dataset),
            "failed": "; ".join(f"seed {r['seed']}: {r['failure']}" for r in group if r["failure"]),
        })
    for row in rows:
        row["versus_vae"] = compare_with_vae(row, rows)
    return rows


def compare_with_vae(row, rows):
    """Does this BTVAE setting beat the VAE by more than the spread between seeds?"""
    if row["lam2"] == 0:
        return ""
    vae = next((r for r in rows if r["dataset"] == row["dataset"] and r["lam2"] == 0), None)
    if vae is None or vae["fid_mean"] is None or row["fid_mean"] is None:
        return "no comparison (missing runs)"
    if len(row["seeds"].split(",")) < 2 or len(vae["seeds"].split(",")) < 2:
        return "no comparison (needs 2+ seeds each)"
    gap, spread = vae["fid_mean"] - row["fid_mean"], row["fid_std"] + vae["fid_std"]
    if gap > spread:
        return "better than VAE beyond the seed spread"
    if -gap > spread:
        return "worse than VAE beyond the seed spread"
    return "within the seed spread of VAE"


def number(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def write_table1(rows, out, budget_note):
    columns = ["dataset", "model", "lam2", "seeds", "fid_mean", "fid_std", "precision_mean", "recall_mean",
               "epochs_mean", "paper_fid", "versus_vae", "failed", "budget"]
    with open(out / "table1.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "budget": budget_note or "full"})

    lines = ["# Table 1: FID-64 of BTVAE and the VAE", ""]
    if budget_note:
        lines += [f"> **{budget_note}. Not the paper's protocol; do not compare magnitudes with it.**", ""]
    lines += ["FID-64 (lower is better) as mean ± standard deviation over the seeds listed; precision and recall "
              "(Kynkaanniemi et al. 2019, k = 3) in the same Inception features, means over seeds; the paper's FID "
              "(500 samples, its uint8 conversion bug) for reference only.", "",
              "| data set | model | lambda2 | seeds | FID | precision | recall | epochs | paper's FID | vs. VAE |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row["fid_mean"] is not None:
            fid = f"{row['fid_mean']:.4f} ± {row['fid_std']:.4f}"
        else:
            fid = "no FID" if row["seeds"] else "failed"
        lines.append(f"| {row['dataset']} | {row['model']} | {row['lam2']:g} | {row['seeds'] or '-'} | {fid} "
                     f"| {number(row['precision_mean'], 3)} | {number(row['recall_mean'], 3)} "
                     f"| {number(row['epochs_mean'], 1)} | {number(row['paper_fid'])} | {row['versus_vae']} |")
    failures = [f"- {r['dataset']} lambda2 = {r['lam2']:g}: {r['failed']}" for r in rows if r["failed"]]
    if failures:
        lines += ["", "Failed or unfinished runs:", *failures]
    (out / "table1.md").write_text("\n".join(lines) + "\n")


def representative_run(runs, dataset, lam2):
    """The finished run of a setting whose FID is the median over its seeds (the lowest seed on ties)."""
    candidates = sorted((r for r in runs if r["dataset"] == dataset and r["lam2"] == lam2 and r["metrics"]
                         and not r["folder"].name.startswith("figure3_")),
                        key=lambda r: (r["metrics"]["fid"] if r["metrics"]["fid"] is not None else math.inf, r["seed"]))
    return candidates[(len(candidates) - 1) // 2] if candidates else None


def best_btvae_lam2(rows, dataset):
    scored = [r for r in rows if r["dataset"] == dataset and r["lam2"] != 0 and r["fid_mean"] is not None]
    return min(scored, key=lambda r: r["fid_mean"])["lam2"] if scored else None


def suptitle(figure, title, budget_note):
    """The figure's title, and in red, wrapped to fit, the reduced budget it was made with."""
    if budget_note:
        title += "\n" + textwrap.fill(budget_note, 110)
    figure.suptitle(title, fontsize=10, color="firebrick" if budget_note else "black")


def write_figure2(runs, rows, dataset, out, budget_note):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam2 = best_btvae_lam2(rows, dataset)
    pair = [("VAE", representative_run(runs, dataset, 0.0)), (f"BTVAE, lambda2 = {lam2:g}" if lam2 is not None else "BTVAE",
                                                             representative_run(runs, dataset, lam2))]
    if any(run is None for _, run in pair):
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 6), layout="constrained")
    for axis, (label, run) in zip(axes, pair):
        axis.imshow(plt.imread(run["folder"] / "samples.png"))
        axis.set_title(f"{label}\nseed {run['seed']}, FID {run['metrics']['fid']:.4f}", fontsize=10)
        axis.axis("off")
    suptitle(figure, f"Figure 2, {dataset}: 144 samples from the prior", budget_note)
    path = out / f"figure2_{dataset}.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@torch.no_grad()
def posterior_means(run):
    """The test images' posterior means under a run's model, with their labels."""
    config = json.loads((run["folder"] / "config.json").read_text())
    cfg = btvae.parse_config(["--dataset", config["dataset"], "--data-dir", config["data_dir"],
                              "--image-size", str(config["image_size"]), "--cache-dir", config["cache_dir"]])
    _, _, test = btvae.load_data(cfg)
    model = btvae.load_model(run["folder"] / "model.pt")
    means = torch.cat([model.encode(btvae.to_model_range(batch))[0] for batch in test.images.split(500)])
    return means, test.labels


def write_figure3(runs, out, budget_note):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pair = sorted((r for r in runs if r["folder"].name.startswith("figure3_") and r["metrics"]), key=lambda r: r["lam2"])
    pair = [next((r for r in pair if r["lam2"] == 0), None), next((r for r in pair if r["lam2"] != 0), None)]
    if any(run is None for run in pair):
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 5.6), layout="constrained")
    for axis, run in zip(axes, pair):
        means, labels = posterior_means(run)
        normalised = (means - means.mean(0)) / means.std(0)  # the paper's axes: normalised latent values
        scatter = axis.scatter(normalised[:, 0], normalised[:, 1], c=labels, cmap="tab10", s=2, alpha=0.6,
                               vmin=-0.5, vmax=9.5)
        axis.set_title("VAE" if run["lam2"] == 0 else f"BTVAE, lambda2 = {run['lam2']:g}")
        axis.set_xlabel("z1 (normalised)")
        axis.set_ylabel("z2 (normalised)")
    figure.colorbar(scatter, ax=axes, ticks=range(10), label="digit")
    suptitle(figure, "Figure 3: MNIST test images' posterior means, 2-d latent space", budget_note)
    path = out / "figure3.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_table2(runs, rows, dataset, out, budget_note):
    """A blind pair for the paper's human evaluation; the order is drawn once and kept in the key file."""
    lam2 = best_btvae_lam2(rows, dataset)
    models = {"VAE": representative_run(runs, dataset, 0.0), "BTVAE": representative_run(runs, dataset, lam2)}
    if any(run is None for run in models.values()):
        return None
    folder, key_path = out / f"table2_{dataset}", out / f"table2_{dataset}_key.json"
    if key_path.is_file():
        order = [json.loads(key_path.read_text())[letter]["model"] for letter in "AB"]
    else:
        order = random.SystemRandom().sample(["VAE", "BTVAE"], 2)
    folder.mkdir(exist_ok=True)
    key = {}
    for letter, model in zip("AB", order):
        run = models[model]
        shutil.copyfile(run["folder"] / "samples.png", folder / f"{letter}.png")
        key[letter] = {"model": model, "lam2": run["lam2"], "seed": run["seed"], "run": run["folder"].name}
    key_path.write_text(json.dumps(key, indent=2) + "\n")
    warning = f"<p style='color:firebrick'><b>Reduced budget: {html.escape(budget_note)}</b></p>" if budget_note else ""
    (folder / "index.html").write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Which group is more diverse?</title></head>
<body style="font-family: sans-serif; max-width: 1000px; margin: 2em auto">
{warning}<p>{html.escape(TABLE2_QUESTION)}</p>
<table><tr><th>Group A</th><th>Group B</th></tr>
<tr><td><img src="A.png" width="480"></td><td><img src="B.png" width="480"></td></tr></table>
<p>Group A: rank ____ &nbsp;&nbsp; Group B: rank ____</p>
</body></html>
""")
    return folder


def make_report(out):
    out = Path(out)
    budget_file = out / "BUDGET.txt"  # run_all.sh writes it when QUICK=1 (or any reduced budget) was used
    budget_note = budget_file.read_text().strip() if budget_file.is_file() else ""
    runs = read_runs(out / "runs")
    rows = summarise(runs)
    write_table1(rows, out, budget_note)
    made = [out / "table1.md", out / "table1.csv"]
    for dataset in dict.fromkeys(row["dataset"] for row in rows):  # in the table's order
        made += [write_figure2(runs, rows, dataset, out, budget_note), write_table2(runs, rows, dataset, out, budget_note)]
    made.append(write_figure3(runs, out, budget_note))
    return [path for path in made if path is not None]


def main():
    parser = argparse.ArgumentParser(description="Tables and figures from finished btvae.py runs (no training).")
    parser.add_argument("out", type=Path, help="the sweep's folder, holding runs/")
    args = parser.parse_args()
    if not (args.out / "runs").is_dir():
        raise SystemExit(f"report.py: error: {args.out / 'runs'} does not exist; pass the folder run_all.sh wrote (OUT)")
    for path in make_report(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
