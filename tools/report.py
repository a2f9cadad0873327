"""Turn a folder of finished btvae.py runs into the paper's tables and figures. Trains nothing, and needs only
each run's small files (config.json, metrics.json, history.csv, the sample grids, latent.pt), not its model.pt.

    python tools/report.py results            # reads results/runs/*, writes into results/

Writes, beside the runs:
  table1.md, table1.csv    Table 1: per data set and lambda2, mean and standard deviation over seeds of FID-64 and
                           FID-2048 (samples from the prior and from a Gaussian mixture fitted to the latents),
                           precision and recall in 2048-d features, the latent-space metrics, the paper's FID
                           beside ours, and an exact permutation test of each BTVAE setting against the VAE,
                           corrected for the table's many tests (Benjamini-Hochberg)
  figure2_<dataset>.png    Figure 2: 144 samples of the VAE beside those of the best BTVAE (by mean FID), from the
                           prior and from the mixture
  latent_<dataset>.png     the latent space of the VAE and each BTVAE setting: |correlation| between dimensions of
                           the posterior mean, and the sorted per-dimension variances with the active-unit threshold
  figure3.png              Figure 3: MNIST test images' posterior means under 2-d VAE and BTVAE, by digit
  early_stopping.md        how much the validation Barlow Twins term decides which epoch early stopping keeps
  cost.md                  what each finished run cost: seconds of training, of each FID and of the mixture's fit
  diversity.md             for the runs measured in 2048-d features: the mixture sampler against the prior, model
                           by model (paired t-test), and whether FID-64 and FID-2048 order settings and runs alike
  budgets.md               for a full-budget sweep beside a reduced one in quick/ (run_all.sh's QUICK=1 folder):
                           each setting's means at both budgets, and which differences from the VAE hold at each
  table2_<dataset>/        Table 2's material: the two grids as A and B in a random order, with the paper's
                           question in index.html; the key is table2_<dataset>_key.json, kept apart

run_all.sh calls this after its runs; it is kept separate from btvae.py so that file stays about the method.
"""

import argparse
import csv
import functools
import html
import io
import itertools
import json
import math
import random
import re
import statistics
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # btvae.py is at the project's top
import btvae  # noqa: E402

# Table 1 of the paper: FID-64 (how it was computed: PAPER_FID_NOTE).
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


RUN_NAME = re.compile(r"^(?P<dataset>[a-z0-9]+)_lam2=(?P<lam2>[^_]+)(?P<variant>_.+)?_seed(?P<seed>\d+)$")  # run_all.sh's
PAPER_SETTINGS = {"lam1": 0.00025, "bt_on": "mu", "free_bits": 0.0}  # a run with other values is a baseline's


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
        others = {k: config.get(k, default) for k, default in PAPER_SETTINGS.items()}  # those it predates: the defaults
        variant = ", ".join(f"{k} = {v:g}" if k != "bt_on" else f"--bt-on {v}" for k, v in others.items()
                            if v != PAPER_SETTINGS[k]) or (config.get("variant") or "").strip("_")  # a failed run: its name
        run = {"folder": folder, "dataset": config["dataset"], "lam2": lam2, "setting": f"{lam2:g}", "variant": variant,
               **others, "seed": int(config["seed"]), "latent_dim": config["latent_dim"], "metrics": None,
               "failure": None}
        if (folder / "metrics.json").is_file():
            run["metrics"] = json.loads((folder / "metrics.json").read_text())
            run["metrics"]["active_correlation"] = active_correlation(folder)
        elif (folder / "FAILED").is_file():
            run["failure"] = (folder / "FAILED").read_text().strip() or "failed"
        else:
            run["failure"] = "unfinished (interrupted, or still running)"
        runs.append(run)
    return runs


def active_correlation(folder):
    """latent_correlation among the active units only: in a VAE the inactive dimensions, whose means barely
    move, are correlated with each other, and dominate latent_correlation. From latent.pt; None without it."""
    path = folder / "latent.pt"
    if not path.is_file():
        return None
    latent = torch.load(path, weights_only=True)
    active = latent["mu_variance"] > btvae.ACTIVE_UNIT_VARIANCE
    return btvae.mean_absolute_off_diagonal(latent["mu_correlation"][active][:, active])


def setting_order(run):
    """Data sets in the paper's order; the VAE first, then lambda2 ascending (anything not a number last)."""
    lam2 = run["lam2"] if math.isfinite(run["lam2"]) else math.inf
    return DATASET_ORDER.index(run["dataset"]) if run["dataset"] in DATASET_ORDER else len(DATASET_ORDER), lam2 != 0, lam2


def mean_and_spread(values):
    """The mean and the standard deviation of the values given (None where one value gives no spread)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def mean_with_spread(mean, spread, digits, sign=""):
    """'mean ± sd' with the digits given (sign "+": the mean's sign always shown), or the mean alone where one
    seed gives no spread."""
    shown = f"{mean:{sign}.{digits}f}"
    return shown if spread is None else f"{shown} ± {spread:.{digits}f}"


# Table 1's metrics: metrics.json's key, the column's title, and the digits shown. FID-64 is the paper's; the
# 2048-d ones (btvae.py --fid-2048) are the standard FID and the diversity measures, for each sampler.
SAMPLE_METRICS = [("fid", "FID-64 (prior)", 4), ("fid_gmm", "FID-64 (mixture)", 4),
                  ("fid_2048", "FID-2048 (prior)", 2), ("fid_2048_gmm", "FID-2048 (mixture)", 2),
                  ("precision_2048", "precision (prior)", 3), ("recall_2048", "recall (prior)", 3),
                  ("precision_2048_gmm", "precision (mixture)", 3), ("recall_2048_gmm", "recall (mixture)", 3)]
ACTIVITY_METRICS = [("active_units", "active units (> 0.01)", 1), ("active_units_0.05", "> 0.05", 1),
                    ("active_units_0.1", "> 0.1", 1), ("participation_ratio", "participation ratio", 1),
                    ("rate", "rate (nats)", 1), ("reconstruction_error", "reconstruction error", 5)]
LATENT_METRICS = [("latent_correlation", "latent correlation", 3),
                  ("active_correlation", "correlation among active units", 3),
                  ("twin_correlation", "twin correlation", 3), ("probe_accuracy", "probe accuracy", 3)]
EPOCHS = ("epochs_trained", "epochs trained", 1)  # averaged like the metrics, never compared with the VAE's
SIGNIFICANCE = 0.05  # the false discovery rate at which Benjamini-Hochberg keeps a table's verdicts
SEEDS_FOR_A_TEST = 2  # fewer seeds a side get their values alone, untested
# The families Benjamini-Hochberg corrects, each within a data set: the paper's claims (samples and the latent
# space) and where each model sits (unit activity, rate and distortion), which describe rather than claim. One
# family of both would change what a claim needs to survive with every descriptive column added.
FAMILIES = {"claims": [key for key, _, _ in SAMPLE_METRICS + LATENT_METRICS],
            "placement": [key for key, _, _ in ACTIVITY_METRICS]}
COMPARED = SAMPLE_METRICS + ACTIVITY_METRICS + LATENT_METRICS  # each compared with the VAE's, setting by setting
SHARES = {"precision_2048", "recall_2048", "precision_2048_gmm", "recall_2048_gmm", "probe_accuracy"}  # in [0, 1]


def summarise(runs):
    """One row per (data set, lambda2) of the Table 1 runs (latent dimension as configured, not Figure 3's),
    each BTVAE setting tested against the VAE metric by metric, and the verdicts of each data set's tests
    corrected together (Benjamini-Hochberg)."""
    groups = {}
    for run in runs:
        if not run["folder"].name.startswith("figure3_"):
            groups.setdefault((run["dataset"], run["setting"]), []).append(run)
    rows = []
    for (dataset, _), group in sorted(groups.items(), key=lambda kv: setting_order(kv[1][0])):
        lam2 = group[0]["lam2"]
        finished = [r["metrics"] for r in group if r["metrics"] is not None]
        row = {"dataset": dataset, "lam2": lam2, "model": "VAE" if lam2 == 0 else "BTVAE",
               "seeds": ",".join(str(r["seed"]) for r in sorted(group, key=lambda r: r["seed"]) if r["metrics"]),
               "seed_count": len(finished),
               "latent_dim": next((r["latent_dim"] for r in group if r["metrics"]), None),  # active units' ceiling
               "pixel_probe_accuracy": mean_and_spread([m.get("pixel_probe_accuracy") for m in finished])[0],
               "paper_fid": PAPER_TABLE1.get(lam2, {}).get(dataset),
               "failed": "; ".join(f"seed {r['seed']}: {r['failure']}" for r in group if r["failure"])}
        for key, _, _ in COMPARED + [EPOCHS]:
            row[f"{key}_values"] = [m[key] for m in finished if m.get(key) is not None]
            row[f"{key}_n"] = len(row[f"{key}_values"])
            row[f"{key}_mean"], row[f"{key}_std"] = mean_and_spread(row[f"{key}_values"])
        rows.append(row)
    for row in rows:
        vae = next((r for r in rows if r["dataset"] == row["dataset"] and r["lam2"] == 0), None)
        row["vae_seed_count"] = vae["seed_count"] if vae else 0
        for key, _, _ in COMPARED:
            row[f"{key}_vae_mean"] = vae[f"{key}_mean"] if vae else None
            row[f"{key}_p_vs_vae"], row[f"{key}_untested"], row[f"{key}_without_spread"] = \
                compare_with_vae(row, vae, key)
    for dataset, family in itertools.product(dict.fromkeys(row["dataset"] for row in rows), FAMILIES):
        tests = table_tests(rows, dataset, family)
        for (row, key), q in zip(tests, q_values([row[f"{key}_p_vs_vae"] for row, key in tests])):
            row[f"{key}_q_vs_vae"] = q
    for row in rows:
        for key, _, _ in COMPARED:
            row[f"{key}_versus_vae"] = verdict(row, key)
    return rows


def table_tests(rows, dataset, family):
    """The (row, metric) pairs of a data set and a family that were tested against the VAE: what one correction
    takes together."""
    return [(row, key) for row in rows if row["dataset"] == dataset for key in FAMILIES[family]
            if row[f"{key}_p_vs_vae"] is not None]


def difference_of_means(a, b, axis):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


RELABELLINGS = 10**6  # every relabelling of the seeds up to this many; this many drawn at random (seeded) beyond


def permutation_p_value(a, b, paired=False, relabellings=RELABELLINGS):
    """Two-sided p-value of the exact permutation test of the difference between the means of a and b
    (scipy.stats.permutation_test): the share of the ways of relabelling the values (which seeds are a's; with
    paired, which value of each pair is a's) that give a difference of means at least as large, in the
    observed direction, doubled. It assumes nothing about how the values are distributed, so it can be no
    smaller than the seeds allow (smallest_p_value); a p-value from a model of their distribution, such as
    Welch's t-test, can, and is then the model's, not the seeds'. a and b: the seeds' values, or rows of them
    (one p-value per row, as an array). Exact up to `relabellings` ways; beyond, that many drawn (seeded).
    """
    from scipy.stats import permutation_test
    result = permutation_test((np.asarray(a, dtype=float), np.asarray(b, dtype=float)), difference_of_means,
                              permutation_type="samples" if paired else "independent", vectorized=True,
                              n_resamples=relabellings, alternative="two-sided", axis=-1, rng=0)
    return float(result.pvalue) if np.ndim(result.pvalue) == 0 else result.pvalue


def smallest_p_value(seeds, other_seeds=None):
    """The smallest p-value permutation_p_value can give: 2 / C(n + m, n) for two sets of seeds, 2 / 2^n for n
    pairs (other_seeds None)."""
    relabellings = 2 ** seeds if other_seeds is None else math.comb(seeds + other_seeds, seeds)
    return min(1.0, 2 / relabellings)


def survivors_note(dataset, p_and_q_values):
    """'mnist: 54 tests, of which 41 survive (those with p <= 0.036)': a legend's account of a correction."""
    kept = [p for p, q in p_and_q_values if q <= SIGNIFICANCE]
    return (f"{dataset}: {len(p_and_q_values)} tests, of which {len(kept)} survive"
            + (f" (those with p <= {max(kept):.2g})" if kept else ""))


def q_values(p_values):
    """Benjamini-Hochberg's adjusted p-values (scipy.stats.false_discovery_control): a verdict whose q is at most
    SIGNIFICANCE stands with a false discovery rate of SIGNIFICANCE over these tests (when they are
    independent or positively dependent, as metrics of the same runs are)."""
    from scipy.stats import false_discovery_control
    return [float(q) for q in false_discovery_control(p_values, method="bh")] if p_values else []


def in_every_seed(row, key, value, digits):
    """A value that every seed of a side has, and whether it is the metric's floor or ceiling."""
    ceiling = row["latent_dim"] if key.startswith("active_units") else 1 if key in SHARES else None
    bound = (" (the ceiling)" if ceiling is not None and value == ceiling
             else " (the floor)" if ceiling is not None and value == 0 else "")
    return f"{value:.{digits}f} in every seed{bound}"


def compare_with_vae(row, vae, key):
    """(the permutation test's p-value of this setting's seeds against the VAE's on `key`, None, None), or (None,
    why there is no test, the side without spread if that is why: "setting" or "vae"). A side whose seeds all
    have the same value (at a metric's ceiling or floor, say) is not tested: its spread says nothing of how
    far the other side's seeds could fall from it."""
    if row["lam2"] == 0:
        return None, "", None
    if vae is None or not row[f"{key}_values"] or not vae[f"{key}_values"]:
        return None, "no comparison (missing runs)", None
    if min(row[f"{key}_n"], vae[f"{key}_n"]) < SEEDS_FOR_A_TEST:
        return None, f"no comparison (needs {SEEDS_FOR_A_TEST}+ seeds each)", None
    digits = dict((k, d) for k, _, d in COMPARED)[key]
    for name, side, whose in (("setting", row, ""), ("vae", vae, "the VAE's ")):
        if len(set(side[f"{key}_values"])) == 1:
            return None, f"no test: {whose}{in_every_seed(side, key, side[f'{key}_values'][0], digits)}", name
    return permutation_p_value(row[f"{key}_values"], vae[f"{key}_values"]), None, None


def survives(row, key):
    q = row.get(f"{key}_q_vs_vae")
    return q is not None and q <= SIGNIFICANCE


def verdict(row, key):
    """In words: the side this setting is on against the VAE where the test's verdict survives the correction,
    else that none was found, or why there is no test."""
    p = row[f"{key}_p_vs_vae"]
    if p is None:
        return row[f"{key}_untested"]
    tested = f"p = {p:.2g}, q = {row[f'{key}_q_vs_vae']:.2g}"
    if not survives(row, key):
        return f"no difference from VAE found ({tested})"
    return f"{side_word(row, key)} than VAE ({tested})"


def side_word(row, key):
    """better or worse (FIDs: lower is better), else lower or higher: where this setting's mean is."""
    words = ("better", "worse") if key.startswith("fid") else ("lower", "higher")
    return words[row[f"{key}_mean"] > row[f"{key}_vae_mean"]]


DETECTION_POWER = 0.8  # what the legend's "finds" means: in this share of repeated sweeps


@functools.cache  # the same seed counts give the same answer, and a sweep's tables ask for few
def detectable_difference(seeds, vae_seeds, draws=4_000, relabellings=1_000):
    """The difference between two settings' means, in standard deviations of either (the same spread on both
    sides, normal values), that the permutation test finds at p < SIGNIFICANCE with a chance of
    DETECTION_POWER, from `seeds` runs against the VAE's `vae_seeds`, before any correction; None where its
    smallest p-value is not below SIGNIFICANCE. Counted over `draws` simulated sweeps, the same draws for every
    difference tried (a fixed seed: the tables stay the same); beyond `relabellings` ways to relabel the seeds,
    the test of each draw takes that many at random, which keeps the count quick (it finds about as often)."""
    from scipy.optimize import brentq
    if smallest_p_value(seeds, vae_seeds) >= SIGNIFICANCE:
        return None
    generator = np.random.default_rng(0)
    setting, vae = generator.standard_normal((draws, seeds)), generator.standard_normal((draws, vae_seeds))

    def found_minus_power(difference):
        found = permutation_p_value(setting + difference, vae, relabellings=relabellings) < SIGNIFICANCE
        return float(found.mean()) - DETECTION_POWER
    return brentq(found_minus_power, 0, 20, xtol=0.01)


def detection_note(rows):
    """The legend's sentences on what the test can find with the seeds each comparison has."""
    counts = sorted({(row["seed_count"], row["vae_seed_count"]) for row in rows
                     if row["lam2"] != 0 and min(row["seed_count"], row["vae_seed_count"]) >= SEEDS_FOR_A_TEST})
    if not counts:
        return f"No setting has the {SEEDS_FOR_A_TEST} or more seeds a side the test needs."
    smallest = "; ".join(f"{smallest_p_value(seeds, vae_seeds):.2g} with {seeds} seeds against the VAE's {vae_seeds}"
                         for seeds, vae_seeds in counts)
    found = [(detectable_difference(seeds, vae_seeds), seeds, vae_seeds) for seeds, vae_seeds in counts]
    sizes = "; ".join(f"{difference:.1f} standard deviations with {seeds} seeds against the VAE's {vae_seeds}"
                      for difference, seeds, vae_seeds in found if difference is not None)
    never = "; ".join(f"{seeds} seeds against the VAE's {vae_seeds}" for difference, seeds, vae_seeds in found
                      if difference is None)
    return (f"Its smallest possible p-value: {smallest}. "
            + (f"Before the correction, it finds a difference {DETECTION_POWER:.0%} of the time when the means "
               f"are this far apart (normal values, the same spread on both sides): {sizes}. " if sizes else "")
            + (f"With {never} it can find none at p < {SIGNIFICANCE}. " if never else "")
            + "A smaller difference often goes unmarked, so an unmarked cell is not evidence of no difference.")


TESTS_CORRECTED = (f"The side is marked **higher**, **lower**, **better** or **worse** only where the verdict "
                   "survives Benjamini-Hochberg's correction at a false discovery rate of "
                   f"{SIGNIFICANCE} (its q-values are in the CSV): where p is at most the largest p-value that "
                   "survives. The correction takes a data set's tests in two families: the paper's claims (samples "
                   "and the latent space), and where each model sits (unit activity, rate and reconstruction "
                   "error).")


def correction_note(rows):
    """Per data set: how many tests the correction took together, and how many verdicts survive it (at what p)."""
    return "; ".join(survivors_note(f"{dataset}, {family}", [(row[f"{key}_p_vs_vae"], row[f"{key}_q_vs_vae"])
                                                             for row, key in table_tests(rows, dataset, family)])
                     for dataset in dict.fromkeys(row["dataset"] for row in rows) for family in FAMILIES) + "."


def number(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def mean_cell(row, key, digits):
    """'mean ± sd' (with n where fewer seeds have this metric than the row has runs) and, for a BTVAE setting,
    the permutation test's p-value against the VAE, with the side in bold where it survives the correction;
    where a side has one value in every seed, that value and no test."""
    if row[f"{key}_mean"] is None:
        return "-"
    without_spread = row.get(f"{key}_without_spread")
    if without_spread == "setting":
        return in_every_seed(row, key, row[f"{key}_mean"], digits) + ", no test"
    cell = mean_with_spread(row[f"{key}_mean"], row[f"{key}_std"], digits)
    if row[f"{key}_n"] != row["seed_count"]:
        cell += f" (n = {row[f'{key}_n']})"
    if without_spread == "vae":
        return f"{cell}, no test ({row[f'{key}_untested'].removeprefix('no test: ')})"
    p = row.get(f"{key}_p_vs_vae")
    if p is None:
        return cell
    return f"{cell} **{side_word(row, key)}** p = {p:.2g}" if survives(row, key) else f"{cell} p = {p:.2g}"


PAPER_FID_NOTE = ("the paper's FID-64 (Table 1) for reference only: the paper says 10,000 samples (Sec. 3.1); the "
                  "authors' released eval.py (waymao/PyTorch-VAE, last changed in commit 9be0949) draws 500 samples "
                  "of CelebA models and casts `sample * 255` to uint8 without rescaling the Tanh output; whether it "
                  "produced Table 1 is not known")


# Every output is written whole or not at all (btvae.write_atomically): a full disk or a stop part-way through a
# report leaves each file as it was before or as it is now, never cut short, and the error names the file.
def write_text(path, text):
    btvae.write_atomically(path, text.encode())


def save_figure(figure, path):
    """Writes the figure as a PNG and closes it."""
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    pyplot().close(figure)
    btvae.write_atomically(path, image.getvalue())


def write_table1(rows, out, budget_note):
    keys = [key for key, _, _ in COMPARED]
    columns = ["dataset", "model", "lam2", "seeds",
               *(f"{key}_{part}" for key in keys for part in ("mean", "std", "n", "p_vs_vae", "q_vs_vae", "versus_vae")),
               "pixel_probe_accuracy", "epochs_trained_mean", "paper_fid", "failed", "budget"]
    csv_text = io.StringIO(newline="")
    writer = csv.DictWriter(csv_text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: row.get(k) for k in columns if k != "budget"}, "budget": budget_note or "full"})
    write_text(out / "table1.csv", csv_text.getvalue())

    def setting(row):
        return f"| {row['dataset']} | {row['model']} | {row['lam2']:g} | {row['seeds'] or '-'} "

    lines = ["# Table 1: FID of BTVAE and the VAE, the diversity of their samples, and their latent spaces", ""]
    if budget_note:
        lines += [f"> **{budget_note}. Not the paper's protocol; do not compare magnitudes with it.**", ""]
    lines += ["Mean ± standard deviation over the seeds listed (the value alone for one seed; n where fewer seeds "
              "have a measurement). Beside each BTVAE value, the p-value of an exact permutation test (two-sided) "
              "of its seeds against the VAE's: of all the ways to split the two settings' values into as many "
              "seeds as each has, the share whose difference of means is at least the observed one, doubled. It "
              "assumes nothing about how the seeds' values are distributed. "
              f"{TESTS_CORRECTED} {correction_note(rows)} A side whose seeds all have one value (a ceiling or a "
              "floor, say) is not tested: its cell says so. "
              f"{detection_note(rows)}", "",
              "## Samples: FID-64, the paper's measure", "",
              "FID-64 (lower is better) of 10,000 samples decoded from the prior N(0, I) and from a 10-component "
              f"Gaussian mixture fitted to the training images' posterior means; {PAPER_FID_NOTE}.", "",
              "| data set | model | lambda2 | seeds | FID-64 (prior) | FID-64 (mixture) | epochs | paper's FID-64 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        fid = mean_cell(row, "fid", 4) if row["fid_mean"] is not None else ("no FID" if row["seeds"] else "failed")
        lines.append(setting(row) + f"| {fid} | {mean_cell(row, 'fid_gmm', 4)} "
                     f"| {number(row['epochs_trained_mean'], 1)} | {number(row['paper_fid'])} |")
    lines += ["", "## Samples in 2048-d Inception features: FID, precision and recall", "",
              "The standard FID (the 2048-d pool layer, lower is better), and precision (the share of samples within "
              "the test images' feature manifold: realism) and recall (the share of test images within the "
              "samples' manifold: coverage, the diversity the paper's Table 2 asks about) of Kynkaanniemi et al. "
              "(2019, k = 3), for each sampler, from the same 10,000 samples as FID-64 (btvae.py --fid-2048).", "",
              "| data set | model | lambda2 | seeds | " + " | ".join(title for key, title, _ in SAMPLE_METRICS[2:]) + " |",
              "| --- | --- | --- | --- |" + " --- |" * len(SAMPLE_METRICS[2:])]
    for row in rows:
        lines.append(setting(row) + "| " + " | ".join(mean_cell(row, key, digits) for key, _, digits in SAMPLE_METRICS[2:])
                     + " |")
    lines += ["", "## Unit activity and the rate-distortion plane", "",
              "Active units: dimensions whose posterior mean varies over the test images with variance above "
              "0.01 (Burda et al.'s threshold), 0.05 and 0.1; the participation ratio (sum of the variances)^2 / "
              "(sum of their squares), an effective number of dimensions that needs no threshold. Rate: the "
              "validation KL of the kept epoch, in nats; reconstruction error: its validation MSE per pixel "
              "(what early stopping saw; from history.csv).", "",
              "| data set | model | lambda2 | seeds | " + " | ".join(title for _, title, _ in ACTIVITY_METRICS) + " |",
              "| --- | --- | --- | --- |" + " --- |" * len(ACTIVITY_METRICS)]
    for row in rows:
        lines.append(setting(row) + "| " + " | ".join(mean_cell(row, key, digits) for key, _, digits in ACTIVITY_METRICS)
                     + " |")
    lines += ["", "## Latent space", "",
              "On the test split, model in evaluation mode: latent correlation (mean |correlation| between different dimensions of the "
              "posterior mean; beside it among the active units alone), twin correlation (mean diagonal of Eq. 3's C between images' and their "
              "reconstructions' embeddings), probe accuracy (a linear classifier on the posterior means; beside it "
              "the same classifier on raw pixels).", "",
              "| data set | model | lambda2 | seeds | latent correlation | among active units "
              "| twin correlation | probe accuracy | probe on pixels |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = " | ".join(mean_cell(row, key, digits) for key, _, digits in LATENT_METRICS)
        lines.append(setting(row) + f"| {cells} | {number(row['pixel_probe_accuracy'], 3)} |")
    failures = [f"- {r['dataset']} lambda2 = {r['lam2']:g}: {r['failed']}" for r in rows if r["failed"]]
    if failures:
        lines += ["", "Failed or unfinished runs:", *failures]
    write_text(out / "table1.md", "\n".join(lines) + "\n")


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
    """The figure's title, and in red the reduced budget it was made with, both wrapped to the figure's width."""
    width = int(figure.get_figwidth() * 12)  # characters of 10-point text per line
    title = textwrap.fill(title, width) + ("\n" + textwrap.fill(budget_note, width) if budget_note else "")
    figure.suptitle(title, fontsize=10, color="firebrick" if budget_note else "black")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_figure2(runs, rows, dataset, out, budget_note):
    """The VAE's samples beside the best BTVAE's: from the prior (the paper's Figure 2), and from the mixture."""
    plt = pyplot()
    lam2 = best_btvae_lam2(rows, dataset)
    pair = [("VAE", representative_run(runs, dataset, 0.0)), (f"BTVAE, lambda2 = {lam2:g}" if lam2 is not None else "BTVAE",
                                                             representative_run(runs, dataset, lam2))]
    if any(run is None for _, run in pair):
        return None
    samplers = [("prior N(0, I)", "samples.png", "fid")]
    if all((run["folder"] / "samples_gmm.png").is_file() for _, run in pair):
        samplers.append(("mixture fitted to the latents", "samples_gmm.png", "fid_gmm"))
    figure, axes = plt.subplots(len(samplers), 2, figsize=(10, 6 * len(samplers)), layout="constrained", squeeze=False)
    for row, (sampler, file, key) in enumerate(samplers):
        for axis, (label, run) in zip(axes[row], pair):
            axis.imshow(plt.imread(run["folder"] / file))
            axis.set_title(f"{label}, from the {sampler}\nseed {run['seed']}, FID {number(run['metrics'].get(key))}",
                           fontsize=10)
            axis.axis("off")
    suptitle(figure, f"Figure 2, {dataset}: 144 samples", budget_note)
    path = out / f"figure2_{dataset}.png"
    save_figure(figure, path)
    return path


def latent_file(run):
    """The run's latent.pt (what btvae.py measured of its latent space), or None for runs made before it existed."""
    path = run["folder"] / "latent.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None


def write_figure3(runs, out, budget_note):
    plt = pyplot()
    pair = sorted((r for r in runs if r["folder"].name.startswith("figure3_") and r["metrics"]), key=lambda r: r["lam2"])
    pair = [next((r for r in pair if r["lam2"] == 0), None), next((r for r in pair if r["lam2"] != 0), None)]
    if any(run is None or latent_file(run) is None for run in pair):
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 5.6), layout="constrained")
    for axis, run in zip(axes, pair):
        latent = latent_file(run)
        means = latent["test_mu"]
        normalised = (means - means.mean(0)) / means.std(0)  # the paper's axes: normalised latent values
        scatter = axis.scatter(normalised[:, 0].numpy(), normalised[:, 1].numpy(), c=latent["test_labels"].numpy(), cmap="tab10", s=2,
                               alpha=0.6, vmin=-0.5, vmax=9.5)
        axis.set_title("VAE" if run["lam2"] == 0 else f"BTVAE, lambda2 = {run['lam2']:g}")
        axis.set_xlabel("z1 (normalised)")
        axis.set_ylabel("z2 (normalised)")
    figure.colorbar(scatter, ax=axes, ticks=range(10), label="digit")
    suptitle(figure, "Figure 3: MNIST test images' posterior means, 2-d latent space", budget_note)
    path = out / "figure3.png"
    save_figure(figure, path)
    return path


def write_latent_figure(runs, rows, dataset, out, budget_note):
    """The mechanism at a glance: for the VAE and each BTVAE setting (its median-FID seed), the |correlation|
    matrix of the posterior means over the test images, and their per-dimension variances, sorted."""
    plt = pyplot()
    shown = [(row["lam2"], representative_run(runs, dataset, row["lam2"])) for row in rows if row["dataset"] == dataset]
    shown = [(lam2, run, latent_file(run)) for lam2, run in shown if run is not None and latent_file(run) is not None]
    if not shown:
        return None
    figure, axes = plt.subplots(2, len(shown), figsize=(2.6 * len(shown) + 1, 6.5), layout="constrained", squeeze=False)
    for column, (lam2, run, latent) in enumerate(shown):
        metrics = run["metrics"]
        order = latent["mu_variance"].argsort(descending=True)  # the active units first, top left
        image = axes[0, column].imshow(latent["mu_correlation"][order][:, order].abs().numpy(), vmin=0, vmax=1,
                                       cmap="magma")
        axes[0, column].set_title(f"{'VAE' if lam2 == 0 else f'BTVAE {lam2:g}'} (seed {run['seed']})\n"
                                  f"mean |off-diagonal| {number(metrics.get('latent_correlation'), 3)}\n"
                                  f"among active units {number(metrics.get('active_correlation'), 3)}", fontsize=9)
        axes[0, column].set_xticks([])
        axes[0, column].set_yticks([])
        variances = latent["mu_variance"].sort(descending=True).values.clamp(min=1e-8).numpy()
        axes[1, column].semilogy(range(1, len(variances) + 1), variances, ".", markersize=3)
        axes[1, column].axhline(0.01, color="firebrick", linestyle="--", linewidth=1)
        axes[1, column].set_title(f"{metrics.get('active_units')} active units", fontsize=9)
        axes[1, column].set_xlabel("dimension (sorted)", fontsize=8)
    axes[1, 0].set_ylabel("variance of mu over test images\n(dashed: 0.01)", fontsize=8)
    figure.colorbar(image, ax=axes[0, :], shrink=0.8, label="|correlation|")
    suptitle(figure, f"Latent space, {dataset}: |correlation| between the dimensions of mu over the test images, "
                     "ordered by their variance (top), and the variances (bottom)", budget_note)
    path = out / f"latent_{dataset}.png"
    save_figure(figure, path)
    return path


def read_history(run):
    with open(run["folder"] / "history.csv", newline="") as file:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(file)]


def early_stopping_rows(runs):
    """How much the validation Barlow Twins term drives early stopping, per setting (mean over seeds).

    Early stopping keeps the epoch with the lowest validation loss, recon + lam1 KL + lam2 BT. In evaluation
    mode the encoder normalises with BatchNorm's running statistics, which the re-encoding of
    reconstructions also updated; the validation BT term can then be far from the training one. This
    compares that epoch with the one the ELBO part alone (recon + lam1 KL) would have chosen.
    """
    groups = {}
    for run in runs:
        if run["metrics"] and (run["folder"] / "history.csv").is_file() and not run["folder"].name.startswith("figure3_"):
            groups.setdefault((run["dataset"], run["lam2"]), []).append(run)
    rows = []
    for (dataset, lam2), group in sorted(groups.items(), key=lambda kv: setting_order(kv[1][0])):
        per_seed = []
        for run in group:
            history = read_history(run)
            lam1 = float(json.loads((run["folder"] / "config.json").read_text())["lam1"])
            elbo = [h["val_recon"] + lam1 * h["val_kl"] for h in history]
            chosen = min(range(len(history)), key=lambda i: history[i]["val_loss"])
            by_elbo = min(range(len(history)), key=lambda i: elbo[i])
            best = history[chosen]
            bt_ratios = [h["val_bt"] / h["train_bt"] for h in history] if lam2 else [None]
            weighted_bt = abs(lam2 * best["val_bt"])
            per_seed.append({"epochs": len(history), "stopped_early": bool(run["metrics"]["stopped_early"]),
                             "best_epoch": chosen + 1, "elbo_best_epoch": by_elbo + 1,
                             "bt_share": weighted_bt / (elbo[chosen] + weighted_bt),
                             "bt_ratio_min": min(bt_ratios) if lam2 else None,
                             "bt_ratio_max": max(bt_ratios) if lam2 else None,
                             "elbo_cost": elbo[chosen] / elbo[by_elbo] - 1})
        rows.append({"dataset": dataset, "lam2": lam2, "seeds": len(per_seed),
                     "epochs": statistics.fmean(p["epochs"] for p in per_seed),
                     "stopped_early": sum(p["stopped_early"] for p in per_seed),
                     "best_epoch": statistics.fmean(p["best_epoch"] for p in per_seed),
                     "elbo_best_epoch": statistics.fmean(p["elbo_best_epoch"] for p in per_seed),
                     "different_epoch": sum(p["best_epoch"] != p["elbo_best_epoch"] for p in per_seed),
                     "bt_share": statistics.fmean(p["bt_share"] for p in per_seed),
                     "bt_ratio_min": None if lam2 == 0 else min(p["bt_ratio_min"] for p in per_seed),
                     "bt_ratio_max": None if lam2 == 0 else max(p["bt_ratio_max"] for p in per_seed),
                     "elbo_cost": statistics.fmean(p["elbo_cost"] for p in per_seed)})
    return rows


def page_heading(title, budget_note):
    """A page's title, and the reduced budget its runs were made with, if any."""
    return [f"# {title}", ""] + ([f"> **{budget_note}.**", ""] if budget_note else [])


def write_early_stopping(runs, out, budget_note):
    rows = early_stopping_rows(runs)
    if not rows:
        return None
    lines = page_heading("Early stopping and the validation Barlow Twins term", budget_note)
    lines += ["Early stopping keeps the epoch with the lowest validation loss (recon + lambda1 KL + lambda2 BT). "
              "Per setting, over its seeds: epochs trained and how many seeds stopped early; the mean best epoch, and "
              "the mean epoch that the ELBO part alone (recon + lambda1 KL) would have picked among the same epochs, "
              "with the number of seeds where the two differ and how much worse the chosen epoch's validation ELBO "
              "is; the share of |lambda2 BT| in the chosen epoch's validation loss (|lambda2 BT| / (ELBO + "
              "|lambda2 BT|)); the smallest and largest ratio of validation to training BT in any epoch of any "
              "seed.", "",
              "| data set | lambda2 | seeds | epochs | stopped early | best epoch | best by ELBO | seeds differing "
              "| ELBO cost | BT share of val loss | val/train BT |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratios = "-" if r["bt_ratio_min"] is None else f"{r['bt_ratio_min']:.2f} to {r['bt_ratio_max']:.1f}"
        lines.append(f"| {r['dataset']} | {r['lam2']:g} | {r['seeds']} | {r['epochs']:.1f} | {r['stopped_early']} "
                     f"| {r['best_epoch']:.1f} | {r['elbo_best_epoch']:.1f} | {r['different_epoch']} "
                     f"| {100 * r['elbo_cost']:.1f}% | {100 * r['bt_share']:.1f}% | {ratios} |")
    path = out / "early_stopping.md"
    write_text(path, "\n".join(lines) + "\n")
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
        btvae.write_atomically(folder / f"{letter}.png", (run["folder"] / "samples.png").read_bytes())
        key[letter] = {"model": model, "lam2": run["lam2"], "seed": run["seed"], "run": run["folder"].name}
    write_text(key_path, json.dumps(key, indent=2) + "\n")
    warning = f"<p style='color:firebrick'><b>Reduced budget: {html.escape(budget_note)}</b></p>" if budget_note else ""
    write_text(folder / "index.html", f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Which group is more diverse?</title></head>
<body style="font-family: sans-serif; max-width: 1000px; margin: 2em auto">
{warning}<p>{html.escape(TABLE2_QUESTION)}</p>
<table><tr><th>Group A</th><th>Group B</th></tr>
<tr><td><img src="A.png" width="480"></td><td><img src="B.png" width="480"></td></tr></table>
<p>Group A: rank ____ &nbsp;&nbsp; Group B: rank ____</p>
</body></html>
""")
    return folder


# The diversity reading: each measure of the samples, from the prior and from the mixture of the same model.
SAMPLER_MEASURES = [("fid", "FID-64", 4, ("better", "worse")), ("fid_2048", "FID-2048", 2, ("better", "worse")),
                    ("precision_2048", "precision", 3, ("lower", "higher")),
                    ("recall_2048", "recall", 3, ("lower", "higher"))]


def kendall_cell(pairs):
    """Kendall's tau between the two values of each pair, with its two-sided p-value; '-' below three pairs."""
    from scipy.stats import kendalltau
    if len(pairs) < 3:
        return "-"
    result = kendalltau([a for a, _ in pairs], [b for _, b in pairs])
    return f"{result.statistic:.2f} (p = {result.pvalue:.2g}, n = {len(pairs)})"


def write_diversity(runs, out, budget_note):
    """For the runs measured in 2048-d features (btvae.py --fid-2048): the mixture sampler against the prior,
    model by model; and whether FID-64 and FID-2048 put the settings, and the runs, in the same order."""
    measured = [r for r in runs if r["metrics"] and r["metrics"].get("fid_2048") is not None
                and not r["folder"].name.startswith("figure3_")]
    if not measured:
        return None
    groups = {}
    for run in sorted(measured, key=lambda r: (setting_order(r), r["seed"])):
        groups.setdefault((run["dataset"], run["setting"]), []).append(run)
    lines = page_heading("Diversity: the two samplers, and FID-64 against FID-2048", budget_note)
    comparisons = {}  # (dataset, setting, key): the mixture's values and the prior's, seed by seed, and the test's p
    for (dataset, setting), group in groups.items():
        for key, _, _, _ in SAMPLER_MEASURES:
            prior, mixture = [r["metrics"][key] for r in group], [r["metrics"][f"{key}_gmm"] for r in group]
            tested = len(group) >= SEEDS_FOR_A_TEST and len(set(prior + mixture)) > 1
            comparisons[dataset, setting, key] = mixture, prior, (permutation_p_value(mixture, prior, paired=True)
                                                                  if tested else None)
    q = {}
    for dataset in dict.fromkeys(d for d, _ in groups):
        tests = [name for name, (_, _, p) in comparisons.items() if name[0] == dataset and p is not None]
        q.update(zip(tests, q_values([comparisons[name][2] for name in tests])))
    seed_counts = sorted({len(group) for group in groups.values() if len(group) >= SEEDS_FOR_A_TEST})
    lines += ["Only runs measured with btvae.py --fid-2048. Per setting, over its seeds: the mixture sampler's value "
              "minus the prior's, from the same model (mean ± standard deviation), in how many seeds it is lower "
              "or higher, and the p-value of an exact paired permutation test (two-sided): of the 2^n ways to "
              "swap the two values of each of the n models, the share whose mean difference is at least the "
              "observed one, doubled. It cannot be below 2 / 2^n ("
              + ", ".join(f"{smallest_p_value(n):.2g} with {n} seeds" for n in seed_counts) + "). The mixture is "
              "marked **better**, **worse**, **higher** or **lower** where the verdict survives Benjamini-Hochberg's "
              f"correction for all of a data set's tests in this table at a false discovery rate of {SIGNIFICANCE}; "
              + "; ".join(survivors_note(dataset, [(comparisons[name][2], value) for name, value in q.items()
                                                   if name[0] == dataset])
                          for dataset in dict.fromkeys(d for d, _ in groups))
              + ". Where both samplers give one value in every seed there is no test. Precision: the share of "
              "samples within the test images' feature manifold (realism); recall: the share of test images within "
              "the samples' (coverage).", "",
              "| data set | lambda2 | seeds | " + " | ".join(f"{title}: mixture - prior" for _, title, _, _ in
                                                          SAMPLER_MEASURES) + " |",
              "| --- | --- | --- |" + " --- |" * len(SAMPLER_MEASURES)]
    for (dataset, setting), group in groups.items():
        cells = []
        for key, _, digits, words in SAMPLER_MEASURES:
            mixture, prior, p = comparisons[dataset, setting, key]
            differences = [after - before for after, before in zip(mixture, prior)]
            difference, spread = mean_and_spread(differences)
            cell = mean_with_spread(difference, spread, digits, sign="+")
            if len(set(prior + mixture)) == 1:
                cell = f"both {prior[0]:.{digits}f} in every seed, no test"
            elif difference != 0:
                moved = sum((d < 0) if difference < 0 else (d > 0) for d in differences)
                cell += f" ({'lower' if difference < 0 else 'higher'} in {moved} of {len(differences)})"
            if p is not None:
                cell += f" **{words[difference > 0]}** p = {p:.2g}" if q[dataset, setting, key] <= SIGNIFICANCE \
                    else f" p = {p:.2g}"
            cells.append(cell)
        lines.append(f"| {dataset} | {setting} | {','.join(str(r['seed']) for r in group)} | " + " | ".join(cells)
                     + " |")
    lines += ["", "Do the two FIDs order the settings alike? Per sampler, the settings from best to worst by their "
              "mean FID-64 and by their mean FID-2048 over the same runs, and Kendall's tau (1: the same order, "
              "-1: reversed) with its two-sided p-value, between the settings' means and between the single runs.", "",
              "| data set | sampler | by FID-64 | by FID-2048 | tau, settings | tau, runs |",
              "| --- | --- | --- | --- | --- | --- |"]
    for dataset in dict.fromkeys(d for d, _ in groups):
        in_dataset = {setting: [r["metrics"] for r in group] for (d, setting), group in groups.items() if d == dataset}
        for suffix, sampler in (("", "prior"), ("_gmm", "mixture")):
            means = {setting: [statistics.fmean(m[key + suffix] for m in metrics) for key in ("fid", "fid_2048")]
                     for setting, metrics in in_dataset.items()}
            orders = [" < ".join(sorted(means, key=lambda setting: means[setting][i])) for i in (0, 1)]
            single = [(m["fid" + suffix], m["fid_2048" + suffix]) for metrics in in_dataset.values() for m in metrics]
            lines.append(f"| {dataset} | {sampler} | {orders[0]} | {orders[1]} | {kendall_cell(list(means.values()))} "
                         f"| {kendall_cell(single)} |")
    path = out / "diversity.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


# The parts of a run that metrics.json times (training is the sum over epochs, across a resume).
COST_PARTS = [("train_seconds", "training"), ("latent_seconds", "latent metrics"), ("fid_seconds", "FID (prior)"),
              ("mixture_fit_seconds", "mixture fit"), ("fid_gmm_seconds", "FID (mixture)")]


def write_cost(runs, out, budget_note):
    """Seconds each finished run spent in each part, as its metrics.json recorded them, and the sweep's total."""
    finished = [run for run in runs if run["metrics"]]
    if not finished:
        return None
    lines = page_heading("What the sweep cost", budget_note)
    lines += ["Seconds each finished run spent in each part, from its metrics.json (the time to start Python and "
              "load the data is not in it), on whatever machine ran it and with whatever else shared that machine; "
              "training counts every epoch that finished, across a resume. The Inception features of the test "
              "images are computed once per cache, inside the first run's FID.", "",
              "| run | epochs | " + " | ".join(title for _, title in COST_PARTS) + " | total |",
              "| --- | --- |" + " --- |" * (len(COST_PARTS) + 1)]
    totals = [0.0] * len(COST_PARTS)
    for run in sorted(finished, key=lambda r: (r["folder"].name.startswith("figure3_"), setting_order(r), r["seed"])):
        seconds = [run["metrics"].get(key) for key, _ in COST_PARTS]  # None: not done (a run without FID)
        totals = [total + (part or 0.0) for total, part in zip(totals, seconds)]
        lines.append(f"| {run['folder'].name} | {run['metrics']['epochs_trained']} | "
                     + " | ".join("-" if part is None else f"{part:,.0f}" for part in seconds)
                     + f" | {sum(part or 0.0 for part in seconds):,.0f} |")
    lines.append(f"| all {len(finished)} runs | | " + " | ".join(f"{total:,.0f}" for total in totals)
                 + f" | {sum(totals):,.0f} ({sum(totals) / 3600:.1f} hours) |")
    path = out / "cost.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


BUDGET_METRICS = [("fid", "FID (prior)", 4), ("fid_gmm", "FID (mixture)", 4), *ACTIVITY_METRICS, *LATENT_METRICS, EPOCHS]


def write_budgets(rows, out):
    """The full budget's Table 1 beside the reduced one that run_all.sh's QUICK=1 wrote into out/quick: what
    the paper's budget changes, and whether each difference from the VAE holds at both."""
    quick = out / "quick"
    if not (quick / "runs").is_dir():
        return None
    full_rows = {(r["dataset"], r["lam2"]): r for r in rows}
    quick_rows = {(r["dataset"], r["lam2"]): r for r in summarise(read_runs(quick / "runs"))}
    quick_note = (quick / "BUDGET.txt").read_text().strip() if (quick / "BUDGET.txt").is_file() else "quick/"
    lines = ["# The paper's budget beside the reduced one", "",
             f"Each cell: the full budget (this folder) / the reduced one (quick/: {quick_note}). Mean ± standard "
             "deviation over seeds, with the permutation test's p-value against the VAE at the same budget and the "
             "side marked where the verdict survives the correction of that budget's own table (table1.md, "
             "quick/table1.md); - where a budget has no finished run of the setting.", ""]
    for dataset in dict.fromkeys(dataset for dataset, _ in [*full_rows, *quick_rows]):
        settings = sorted({lam2 for d, lam2 in [*full_rows, *quick_rows] if d == dataset}, key=lambda l: (l != 0, l))
        lines += [f"## {dataset}", "",
                  "| metric | " + " | ".join("VAE" if lam2 == 0 else f"lambda2 = {lam2:g}" for lam2 in settings) + " |",
                  "| --- |" + " --- |" * len(settings)]
        for key, title, digits in BUDGET_METRICS:
            cells = (" / ".join(mean_cell(budget[dataset, lam2], key, digits) if (dataset, lam2) in budget else "-"
                                for budget in (full_rows, quick_rows)) for lam2 in settings)
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        lines.append("")
    path = out / "budgets.md"
    write_text(path, "\n".join(lines))
    return path


# "Is it more than a weaker KL?" (results/README.md): the rate-matched baselines, by the rule written before their runs
MATCH_TOLERANCE = 0.10  # a level within 10% of BTVAE(0.025)'s rate is matched; else one more level is added (run_all.sh)
PRIMARY = [("probe_accuracy", "probe accuracy", 3, +0.003), ("fid_2048_gmm", "FID-2048 (mixture)", 2, -3.0),
           ("recall_2048", "recall (prior)", 3, +0.03), ("reconstruction_error", "reconstruction error", 5, None)]
DESIGN_SEEDS = 5  # the rule decides at 5 seeds against 5
RECONSTRUCTION_ALLOWANCE = 1.10  # BTVAE's reconstruction error at most 10% above the matched beta-VAE's
DOSE_METRICS = [("fid", "FID-64 (prior)"), ("fid_2048_gmm", "FID-2048 (mixture)"), ("recall_2048", "recall (prior)"),
                ("probe_accuracy", "probe accuracy"), ("participation_ratio", "participation ratio"), ("rate", "rate")]


def spearman_permutation(x, y, resamples=20_000):
    """Spearman's rank correlation of x and y, and the two-sided p-value of a permutation test of it: y's values
    in every order against x's where there are at most `resamples` orders, else that many, drawn with a fixed seed."""
    from scipy.stats import permutation_test, spearmanr
    result = permutation_test((y,), lambda b: spearmanr(x, b).statistic, permutation_type="pairings",
                              n_resamples=resamples, random_state=0)
    return float(result.statistic), float(result.pvalue)


def baseline_groups(runs):
    """MNIST's finished full-budget runs of the experiment, by arm: (name, lambda1, runs)."""
    finished = [r for r in runs if r["metrics"] and r["dataset"] == "mnist" and not r["folder"].name.startswith("figure3_")]
    arms = {}
    for run in finished:
        if run["lam2"] == 0 and run["bt_on"] == "mu" and run["free_bits"] == 0:
            name = "VAE" if run["lam1"] == PAPER_SETTINGS["lam1"] else f"beta-VAE, lambda1 = {run['lam1']:g}"
        elif run["lam2"] == 0.025 and run["lam1"] == PAPER_SETTINGS["lam1"] and run["free_bits"] == 0:
            name = "BTVAE(0.025)" if run["bt_on"] == "mu" else f"BTVAE(0.025), --bt-on {run['bt_on']}"
        elif run["lam2"] == 0 and run["free_bits"] and run["lam1"] == PAPER_SETTINGS["lam1"]:
            name = f"free bits {run['free_bits']:g}"
        else:
            continue
        arms.setdefault(name, []).append(run)
    return {name: sorted(group, key=lambda r: r["seed"]) for name, group in arms.items()}


def matched_level(arms):
    """The beta-VAE level (lambda1 below the VAE's) whose seed 0's rate is nearest BTVAE(0.025)'s mean over its
    seeds 0-2, and whether it is within MATCH_TOLERANCE; None before both are measured."""
    btvae_rates = [r["metrics"].get("rate") for r in arms.get("BTVAE(0.025)", []) if r["seed"] <= 2]
    btvae_rates = [rate for rate in btvae_rates if rate is not None]  # runs of code older than the rate have none
    levels = {name: next((r["metrics"].get("rate") for r in group if r["seed"] == 0), None)
              for name, group in arms.items() if name.startswith("beta-VAE")}
    levels = {name: rate for name, rate in levels.items() if rate is not None}
    if not btvae_rates or not levels:
        return None, None, False
    target = statistics.fmean(btvae_rates)
    name = min(levels, key=lambda n: abs(levels[n] - target))
    return name, target, abs(levels[name] - target) <= MATCH_TOLERANCE * target


def decision(variant, seeds, other_seeds, found, recon):
    """The decision rule's reading of one comparison: BTVAE(0.025) against the matched beta-VAE, or (variant) the
    authors' variant against BTVAE(0.025); found: the metrics better beyond their margins, with the verdict surviving
    the correction; recon: the ratio of the reconstruction errors."""
    if min(seeds, other_seeds) < DESIGN_SEEDS:
        return (f"not yet: {seeds} seeds against {other_seeds}; the rule decides at {DESIGN_SEEDS} against "
                f"{DESIGN_SEEDS} (the tests above are interim).")
    more = bool(found) and recon <= RECONSTRUCTION_ALLOWANCE
    return (f"better beyond its margin on {', '.join(found) or 'none of the three'}, with a reconstruction error "
            f"{recon:.2f}x" + ("" if recon <= RECONSTRUCTION_ALLOWANCE else ", more than the rule allows") + ": "
            + ("by the rule, the authors' variant is better than BTVAE(0.025)." if more and variant else
               "the authors' variant is not found better than BTVAE(0.025)." if variant else
               "by the rule, the Barlow Twins term adds something beyond a weaker KL term." if more else
               "by the rule, its effect is matched (or beaten) by a weaker KL term."))


def write_baselines(runs, out, budget_note):
    """baselines.md and rate_distortion_mnist.png: the experiment's arms, the primary family's tests and the
    decision rule's verdict, the dose-response readings. Nothing before its runs (or at a reduced budget)."""
    arms = baseline_groups(runs)
    if budget_note or not any(name.startswith(("beta-VAE", "free bits")) or "--bt-on" in name for name in arms):
        return []
    for run in (r for group in arms.values() for r in group if r["bt_on"] == "mu"):  # runs before btvae.py wrote it:
        run["metrics"].setdefault("twin_correlation_mu", run["metrics"]["twin_correlation"])  # one pair, mu's
    values = {name: {key: [r["metrics"].get(key) for r in group] for key in
                     ("rate", "reconstruction_error", "participation_ratio", "active_units_0.1", "probe_accuracy",
                      "fid_2048_gmm", "recall_2048", "twin_correlation", "twin_correlation_mu")} for name, group in arms.items()}
    cell = lambda name, key, digits: mean_with_spread(*mean_and_spread([v for v in values[name][key] if v is not None]),  # noqa: E731
                                                      digits) if any(v is not None for v in values[name][key]) else "-"
    order = sorted(arms, key=lambda n: (not n.startswith(("VAE", "beta")), -(arms[n][0]["lam1"]), n))
    lines = [*page_heading("Is it more than a weaker KL? Rate-matched baselines on MNIST", ""),
             "Every run of the experiment (results/README.md, \"Is it more than a weaker KL?\", where the design and the "
             "decision rule were written before its runs), at the paper's budget; mean ± sd over the seeds listed. Rate: "
             "the kept epoch's validation KL (nats); beta: 512 x lambda1 / 0.010, the VAE's reconstruction error.", "",
             "| arm | lambda1 | beta | seeds | rate | reconstruction error | participation ratio | active units > 0.1 "
             "| probe accuracy | FID-2048 (mixture) | recall (prior) | twin correlation (mu pair) |",
             "| --- |" + " --- |" * 11]
    for name in order:
        lam1 = arms[name][0]["lam1"]
        lines.append(f"| {name} | {lam1:g} | {512 * lam1 / 0.010:.1f} | {','.join(str(r['seed']) for r in arms[name])} | "
                     + " | ".join(cell(name, key, digits) for key, digits in (
                         ("rate", 1), ("reconstruction_error", 5), ("participation_ratio", 1), ("active_units_0.1", 1),
                         ("probe_accuracy", 3), ("fid_2048_gmm", 2), ("recall_2048", 3), ("twin_correlation_mu", 3))) + " |")
    matched, target, within = matched_level(arms)
    lines += ["", "## The rate-matched level", ""]
    lines.append("Not yet: it needs BTVAE(0.025)'s seeds 0-2 and a beta-VAE level's seed 0." if matched is None else
                 f"BTVAE(0.025)'s mean rate over seeds 0-2 is {target:.1f} nats; the nearest beta-VAE level by its seed 0 "
                 f"is {matched} ({arms[matched][0]['metrics']['rate']:.1f} nats), "
                 + ("within 10%: it is matched." if within else "not within 10%: by the rule, the level halfway in log "
                    "lambda1 between the two that bracket it is added (run_all.sh's BETA_LAM1S), and the nearest taken."))
    tests = []  # the primary family: (comparison, metric, p), corrected together
    pairs = [("BTVAE(0.025)", matched)] if matched and within else []
    pairs += [(name, "BTVAE(0.025)") for name in arms if name.startswith("BTVAE(0.025), --bt-on")]
    for a, b in pairs:
        for key, title, digits, margin in PRIMARY:
            x, y = [v for v in values[a][key] if v is not None], [v for v in values[b][key] if v is not None]
            if min(len(x), len(y)) >= SEEDS_FOR_A_TEST and len(set(x + y)) > 1:
                tests.append((a, b, key, title, digits, margin, x, y, permutation_p_value(x, y)))
    lines += ["", "## The primary family", "",
              "Each comparison by the exact permutation test, the family corrected by Benjamini-Hochberg at a false "
              "discovery rate of 5% (5 seeds against 5 allow p down to 0.0079).", "",
              "| comparison | metric | first | second | difference | p | q |", "| --- | --- | --- | --- | --- | --- | --- |"]
    q = q_values([t[-1] for t in tests])
    for (a, b, key, title, digits, margin, x, y, p), q_value in zip(tests, q):
        lines.append(f"| {a} against {b} | {title} | {statistics.fmean(x):.{digits}f} (n = {len(x)}) | "
                     f"{statistics.fmean(y):.{digits}f} (n = {len(y)}) | {statistics.fmean(x) - statistics.fmean(y):+.{digits}f} "
                     f"| {p:.2g} | {q_value:.2g} |")
    lines += ["", "## The decision", ""]
    for a, b in pairs:
        differences = {key: (statistics.fmean(x) - statistics.fmean(y), margin, q_value) for
                       (ta, tb, key, _, _, margin, x, y, _), q_value in zip(tests, q) if (ta, tb) == (a, b) and margin}
        found = [key for key, (difference, margin, q_value) in differences.items() if q_value <= SIGNIFICANCE
                 and (difference >= margin if margin > 0 else difference <= margin)]  # FID: lower is better
        recon = (statistics.fmean(v for v in values[a]["reconstruction_error"] if v is not None)
                 / statistics.fmean(v for v in values[b]["reconstruction_error"] if v is not None))
        lines.append(f"- {a} against {b}: " + decision(b == "BTVAE(0.025)", len(arms[a]), len(arms[b]), found, recon))
    if not pairs:
        lines.append("Not yet: the matched level needs its seeds.")
    lines += ["", "## Dose-response (reported, not deciding)", "",
              "Spearman's rank correlation between the setting and the metric over every run and seed, with a "
              "permutation test: over lambda2 for the VAE and BTVAE (0 to 0.25, the negative ablation apart), and over "
              "the rate for the VAE and the beta-VAEs, as the rule has it.", "",
              "| metric | over lambda2: rho | p | over the beta-VAEs' rate: rho | p |", "| --- | --- | --- | --- | --- |"]
    paper = [r for r in runs if r["metrics"] and r["dataset"] == "mnist" and not r["variant"] and r["lam2"] >= 0
             and not r["folder"].name.startswith("figure3_")]
    beta = [r for name in arms if name == "VAE" or name.startswith("beta-VAE") for r in arms[name]]
    for key, title in DOSE_METRICS:
        cells = []
        for group, setting in ((paper, "lam2"), (beta, "rate")):  # a run's setting, or one of its metrics
            x = lambda r: r[setting] if setting in r else r["metrics"].get(setting)  # noqa: E731
            kept = [] if key == setting else [(x(r), r["metrics"][key]) for r in group if None not in (x(r), r["metrics"].get(key))]
            rho, p = spearman_permutation(*zip(*kept)) if min(len({x for x, _ in kept}), len({y for _, y in kept})) > 1 \
                else (None, None)  # a setting or a metric that never varies: no test
            cells += [number(rho, 2), "-" if p is None else f"{p:.2g}"]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    write_text(out / "baselines.md", "\n".join(lines) + "\n")
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 5))
    colour_of = [r["metrics"].get("fid_2048_gmm") for name in arms for r in arms[name]]
    scale = dict(vmin=min(c for c in colour_of if c is not None), vmax=max(c for c in colour_of if c is not None)) \
        if any(c is not None for c in colour_of) else {}
    mean = lambda name, key: statistics.fmean(v for v in values[name][key] if v is not None)  # noqa: E731
    means = sorted((mean(n, "rate"), mean(n, "reconstruction_error")) for n in arms if n == "VAE" or n.startswith("beta-VAE")
                   if any(v is not None for v in values[n]["reconstruction_error"]))
    axis.plot(*zip(*means), color="grey", lw=1, label="beta-VAE (the VAE included): level means")
    for name in arms:
        marker = "o" if name == "VAE" or name.startswith("beta") else "s" if name == "BTVAE(0.025)" else "^"
        shown = [(x, y, c) for x, y, c in zip(*(values[name][k] for k in ("rate", "reconstruction_error", "fid_2048_gmm")))
                 if x is not None and y is not None]
        if shown:
            points = axis.scatter([x for x, _, _ in shown], [y for _, y, _ in shown], marker=marker, cmap="viridis",
                                  c=[float("nan") if c is None else c for _, _, c in shown], label=name, **scale)
    figure.colorbar(points, label="FID-2048 (mixture)")
    axis.set(xlabel="rate: validation KL of the kept epoch (nats)", ylabel="reconstruction error (validation MSE)",
             title="MNIST: every run in the rate-distortion plane")
    axis.legend(fontsize=7)
    save_figure(figure, out / "rate_distortion_mnist.png")
    return [out / "baselines.md", out / "rate_distortion_mnist.png"]


def make_report(out):
    out = Path(out)
    budget_file = out / "BUDGET.txt"  # run_all.sh writes it when QUICK=1 (or any reduced budget) was used
    budget_note = budget_file.read_text().strip() if budget_file.is_file() else ""
    every_run = read_runs(out / "runs")
    runs = [run for run in every_run if not run["variant"]]  # the paper's settings; the baselines have a page of their own
    rows = summarise(runs)
    write_table1(rows, out, budget_note)
    made = [out / "table1.md", out / "table1.csv"]
    for dataset in dict.fromkeys(row["dataset"] for row in rows):  # in the table's order
        made += [write_figure2(runs, rows, dataset, out, budget_note), write_table2(runs, rows, dataset, out, budget_note),
                 write_latent_figure(runs, rows, dataset, out, budget_note)]
    made += [write_figure3(runs, out, budget_note), write_early_stopping(runs, out, budget_note),
             write_cost(every_run, out, budget_note), write_diversity(runs, out, budget_note),
             *write_baselines(every_run, out, budget_note)]
    if not budget_note:
        made.append(write_budgets(rows, out))
    return [path for path in made if path is not None]


def runs_without_latent_measurements(out):
    """Finished runs made before btvae.py measured the latent space, with the command that measures them."""
    for run in read_runs(Path(out) / "runs"):
        if run["metrics"] is not None and latent_file(run) is None:
            yield run["folder"], (f"python btvae.py --evaluate {run['folder'] / 'model.pt'} --data-dir DATA "
                                  f"--out {run['folder'] / 'evaluation'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tables and figures from finished btvae.py runs (no training).")
    parser.add_argument("out", type=Path, help="the sweep's folder, holding runs/")
    args = parser.parse_args(argv)
    if not (args.out / "runs").is_dir():
        raise SystemExit(f"report.py: error: {args.out / 'runs'} does not exist; pass the folder run_all.sh wrote (OUT)")
    again = f"python tools/report.py {args.out} remakes them all from the runs, which it never changes"
    try:
        for path in make_report(args.out):
            print(f"wrote {path}")
    except btvae.WriteFailed as error:
        raise SystemExit(f"report.py: stopped: {error}; every other file is whole, and {again}") from None
    except KeyboardInterrupt:
        print(f"report.py: interrupted; every file is whole, and {again}", file=sys.stderr)
        sys.exit(130)
    for folder, command in runs_without_latent_measurements(args.out):
        print(f"note: {folder} has no latent.pt (made by an older btvae.py), so it is missing from the latent-space "
              f"columns and figures; measure its model with: {command}")


if __name__ == "__main__":
    main()
