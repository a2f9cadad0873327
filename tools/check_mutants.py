"""Mutation check: is every line of btvae.py's method and experiments pinned by a test?

    python tools/check_mutants.py            # every mutant below
    python tools/check_mutants.py 3 17       # only these

Each mutant changes one line of btvae.py to something plausible but wrong (a constant moved up or down, a step of
the preprocessing dropped, an operation swapped). The script applies it to a copy of the project in a temporary
folder, runs the tests that specify that part of the file (test_btvae.py's card and TestMethod for parts A-E,
TestExperiments for F-I, the tests on the stand-in GPU for the device handling, the harness's tests for the rest),
and reports the mutant as killed (a test failed) or as survived; it exits with status 1 if any survived. A developer's
check, not part of the test suite: it runs a test file once per mutant. Add a mutant when you add a line.
"""

import shutil, subprocess, sys, tempfile, time  # noqa: E401
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent

# (what the mutant does, the line as it is, the line mutated), by the tests that must kill it
METHOD = [
    ('encoder conv stride 1', 'nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)',
     'nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)'),
    ('no BatchNorm in blocks', 'nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.LeakyReLU())',
     'nn.Sequential(conv, nn.Identity(), nn.LeakyReLU())'),
    ('ReLU instead of LeakyReLU', 'nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.LeakyReLU())',
     'nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU())'),
    ('transposed conv without output padding', 'padding=1, output_padding=1)', 'padding=1, output_padding=0)'),
    ('Tanh output', '            nn.Sigmoid())', '            nn.Tanh())'),
    ('decoder widths not mirrored', 'channels_out = [*reversed(hidden_dims), hidden_dims[0]]',
     'channels_out = [*reversed(hidden_dims), hidden_dims[-1]]'),
    ('encode swaps mu and logvar', 'return self.to_mu(features), self.to_logvar(features)',
     'return self.to_logvar(features), self.to_mu(features)'),
    ('logvar from the mu head', 'return self.to_mu(features), self.to_logvar(features)',
     'return self.to_mu(features), self.to_mu(features)'),
    ('bottleneck check missing', '    if image_size % 2 ** depth:\n        raise ValueError', '    if False:\n        raise ValueError'),
    ('sigma = exp(logvar)', 'sigma = torch.exp(0.5 * logvar)', 'sigma = torch.exp(logvar)'),
    ('uniform noise', 'return mu + sigma * torch.randn_like(sigma)', 'return mu + sigma * torch.rand_like(sigma)'),
    ('noise not scaled', 'return mu + sigma * torch.randn_like(sigma)', 'return mu + torch.randn_like(sigma)'),
    ('KL mean over dimensions', 'kl_per_dimension(mu, logvar).sum(dim=1).mean()', 'kl_per_dimension(mu, logvar).mean(dim=1).mean()'),
    ('KL summed over batch', 'kl_per_dimension(mu, logvar).sum(dim=1).mean()', 'kl_per_dimension(mu, logvar).sum(dim=1).sum()'),
    ('KL sign of log term', '0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar)', '0.5 * (logvar.exp() + mu.pow(2) - 1 + logvar)'),
    ('KL without its 1/2', '0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar)', '(logvar.exp() + mu.pow(2) - 1 - logvar)'),
    ('free bits floor per image, not per batch mean', 'kl_per_dimension(mu, logvar).mean(dim=0).clamp(min=free_bits).sum()',
     'kl_per_dimension(mu, logvar).clamp(min=free_bits).sum(dim=1).mean()'),
    ('free bits as a ceiling', '.clamp(min=free_bits).sum()', '.clamp(max=free_bits).sum()'),
    ('free bits ignored', 'if free_bits else kl), recon, kl', 'if False else kl), recon, kl'),
    ('free bits reported as the KL', 'if free_bits else kl), recon, kl',
     'if free_bits else kl), recon, kl_with_free_bits(mu, logvar, free_bits) if free_bits else kl'),
    ('MSE summed', '    recon = F.mse_loss(x_recon, x)', "    recon = F.mse_loss(x_recon, x, reduction='sum')"),
    ('L1 instead of MSE', '    recon = F.mse_loss(x_recon, x)', '    recon = F.l1_loss(x_recon, x)'),
    ('lambda1 ignored', 'return recon + lam1 * (kl_with', 'return recon + (kl_with'),
    ('unbiased variance', 'torch.sqrt(z.var(dim=0, unbiased=False) + eps)', 'torch.sqrt(z.var(dim=0, unbiased=True) + eps)'),
    ('no mean subtraction', 'return (z - z.mean(dim=0)) / torch.sqrt', 'return z / torch.sqrt'),
    ('BT eps 1e-3', 'BT_EPS = 1e-5', 'BT_EPS = 1e-3'),
    ('BT eps 1e-7', 'BT_EPS = 1e-5', 'BT_EPS = 1e-7'),
    ('C divided by N - 1', 'standardise(z_a).T @ standardise(z_b) / z_a.shape[0]',
     'standardise(z_a).T @ standardise(z_b) / (z_a.shape[0] - 1)'),
    ('C of z_a with itself', 'standardise(z_a).T @ standardise(z_b) / z_a.shape[0]',
     'standardise(z_a).T @ standardise(z_a) / z_a.shape[0]'),
    ('diagonal term not squared', 'on_diagonal = (1 - diagonal).pow(2).sum()', 'on_diagonal = (1 - diagonal).abs().sum()'),
    ('off-diagonal keeps the diagonal', 'off_diagonal = c.pow(2).sum() - diagonal.pow(2).sum()', 'off_diagonal = c.pow(2).sum()'),
    ('delta ignored', 'return on_diagonal + delta * off_diagonal', 'return on_diagonal + 5e-3 * off_diagonal'),
    ('bt_on mu compares mu with logvar_recon', '        return [(mu, mu_recon)]', '        return [(mu, logvar_recon)]'),
    ('bt_on z compares z with mu_recon', '        return [(z, reparameterise(mu_recon, logvar_recon))]',
     '        return [(z, mu_recon)]'),
    ('bt_on z compares mu', '        return [(z, reparameterise(mu_recon, logvar_recon))]',
     '        return [(mu, reparameterise(mu_recon, logvar_recon))]'),
    ('bt_on mu+logvar drops logvar', '    return [(mu, mu_recon), (logvar, logvar_recon)]', '    return [(mu, mu_recon)]'),
    ('re-encodes a detached reconstruction', '    mu_recon, logvar_recon = model.encode(x_recon)',
     '    mu_recon, logvar_recon = model.encode(x_recon.detach())'),
    ('decodes the mean, not a sample', '    x_recon = model.decode(z)\n    loss, recon, kl',
     '    x_recon = model.decode(mu)\n    loss, recon, kl'),
    ('only positive lambda2 adds BT', '    if cfg.lam2 != 0:', '    if cfg.lam2 > 0:'),
    ('lambda2 ignored', '        loss = loss + cfg.lam2 * bt', '        loss = loss + bt'),
    ('delta not passed to BT', 'bt = sum(barlow_twins_loss(z_gt, z_recon, cfg.delta)', 'bt = sum(barlow_twins_loss(z_gt, z_recon)'),
    ('batch not scaled', 'return images_uint8.float().div_(255)', 'return images_uint8.float()'),
    ('last batch kept', 'return list(order[: count - count % batch_size].split(batch_size))', 'return list(order.split(batch_size))'),
    ('no shuffling', 'order = torch.randperm(count, generator=shuffle) if shuffle is not None else torch.arange(count)',
     'order = torch.arange(count)'),
    ('unseeded shuffling', 'order = torch.randperm(count, generator=shuffle) if shuffle is not None',
     'order = torch.randperm(count) if shuffle is not None'),
    ('weight decay', 'lr=cfg.lr, weight_decay=0, fused', 'lr=cfg.lr, weight_decay=1e-4, fused'),
    ('learning rate ignored', 'lr=cfg.lr, weight_decay=0, fused', 'lr=1e-3, weight_decay=0, fused'),
    ('validation in training mode', '    model.train(training)\n', '    model.train(True)\n'),
    ('validation builds a graph', '    with torch.set_grad_enabled(training):', '    with torch.set_grad_enabled(True):'),
    ('no zero_grad', '                optimiser.zero_grad(set_to_none=True)\n', ''),
    ('no optimiser step', '                optimiser.step()\n', ''),
    ('terms returned in the wrong order', 'means = dict(zip(LOSS_TERMS, (totals / seen)', 'means = dict(zip(LOSS_TERMS[::-1], (totals / seen)'),
    ('equal loss counts as improvement', 'if val_terms["loss"] < training.best_loss:', 'if val_terms["loss"] <= training.best_loss:'),
    ('patience off by one', 'training.epochs_without_improvement >= cfg.patience', 'training.epochs_without_improvement > cfg.patience'),
    ('count not reset on improvement', '                training.epochs_without_improvement = 0\n', ''),
    ('best weights not copied', 'training.best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}',
     'training.best_state = model.state_dict()'),
    ('best weights not restored', '            model.load_state_dict(training.best_state)\n    return training',
     '            pass\n    return training'),
    ('runs one epoch past the maximum', 'training.stopped_early or training.epoch == cfg.epochs',
     'training.stopped_early or training.epoch > cfg.epochs'),
    ('early stopping ignored', 'training.finished = training.stopped_early or', 'training.finished = False or'),
    ('shuffle not seeded', 'return cls(optimiser, torch.Generator().manual_seed(cfg.seed))', 'return cls(optimiser, torch.Generator())'),
    ('prior uniform', 'z = torch.randn(count, model.architecture["latent_dim"], generator=generator)',
     'z = torch.rand(count, model.architecture["latent_dim"], generator=generator)'),
    ('prior without the generator', 'z = torch.randn(count, model.architecture["latent_dim"], generator=generator)',
     'z = torch.randn(count, model.architecture["latent_dim"])'),
    ('generate in training mode', '    model.eval()\n    if mixture is None:', '    if mixture is None:'),
    ('reconstruct decodes a sample', '    mu, _ = model.encode(images)\n    return model.decode(mu)',
     '    mu, logvar = model.encode(images)\n    return model.decode(reparameterise(mu, logvar))'),
    ('reconstruct in training mode', '    model.eval()\n    mu, _ = model.encode(images)', '    mu, _ = model.encode(images)'),
]

EXPERIMENTS = [  # each constant moved up and down, each preprocessing step dropped (issue 38)
    ('validation 4,000 images', 'VALIDATION_IMAGES = 5000', 'VALIDATION_IMAGES = 4000'),
    ('validation 6,000 images', 'VALIDATION_IMAGES = 5000', 'VALIDATION_IMAGES = 6000'),
    ('validation a fifth', 'min(VALIDATION_IMAGES, len(training_set) // 10)', 'min(VALIDATION_IMAGES, len(training_set) // 5)'),
    ('validation a twentieth', 'min(VALIDATION_IMAGES, len(training_set) // 10)', 'min(VALIDATION_IMAGES, len(training_set) // 20)'),
    ('holdout seed 1', 'HOLDOUT_SEED = 0', 'HOLDOUT_SEED = 1'),
    ('holdout follows --seed', 'generator=torch.Generator().manual_seed(HOLDOUT_SEED))', 'generator=None)'),
    ('training images reordered', 'split.take(order[count:].sort().values)', 'split.take(order[count:])'),
    ('MNIST padded by 1', 'MNIST_PADDING = 2', 'MNIST_PADDING = 1'),
    ('MNIST padded by 3', 'MNIST_PADDING = 2', 'MNIST_PADDING = 3'),
    ('MNIST not padded', 'F.pad(s.data.unsqueeze(1), (MNIST_PADDING,) * 4)', 's.data.unsqueeze(1)'),
    ('CelebA crop 128', 'CELEBA_CROP = 148', 'CELEBA_CROP = 128'),
    ('CelebA crop 168', 'CELEBA_CROP = 148', 'CELEBA_CROP = 168'),
    ('CelebA not cropped', 'TF.center_crop(TF.pil_to_tensor(image.convert("RGB")), [CELEBA_CROP] * 2)',
     'TF.pil_to_tensor(image.convert("RGB"))'),
    ('resize without antialiasing', 'TF.resize(images, [size, size], antialias=True)', 'TF.resize(images, [size, size], antialias=False)'),
    ('no resize to --image-size', 'Split(resize(s.images, cfg.image_size), s.labels)', 'Split(s.images, s.labels)'),
    ('subset from the end', 'train_split.take(slice(0, cfg.subset))', 'train_split.take(slice(-cfg.subset, None))'),
    ('CIFAR-10 channels last', '.reshape(-1, 3, 32, 32), torch.as_tensor', '.reshape(-1, 32, 32, 3).permute(0, 3, 1, 2), torch.as_tensor'),
    ('FID input not clamped', 'images = images.clamp(0, 1).mul(255).round().to(torch.uint8)', 'images = images.mul(255).round().to(torch.uint8)'),
    ('FID input truncated, not rounded', 'images.clamp(0, 1).mul(255).round().to(torch.uint8)', 'images.clamp(0, 1).mul(255).to(torch.uint8)'),
    ('grayscale not repeated', 'return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images', 'return images'),
    ('biased covariance', '        return mean, centred.T @ centred / (len(features) - 1)', '        return mean, centred.T @ centred / len(features)'),
    ('FID without the factor 2', 'cov_fake.trace() - 2 * trace_sqrt)', 'cov_fake.trace() - trace_sqrt)'),
    ('FID mean term not squared', 'return float((mean_real - mean_fake).square().sum()', 'return float((mean_real - mean_fake).abs().sum()'),
    ('FID sqrt of the trace', 'torch.linalg.eigvals(cov_real @ cov_fake).sqrt().real.sum()',
     'torch.linalg.eigvals(cov_real @ cov_fake).real.sum().sqrt()'),
    ('k = 2', 'PRECISION_RECALL_NEIGHBOURS = 3', 'PRECISION_RECALL_NEIGHBOURS = 2'),
    ('k = 4', 'PRECISION_RECALL_NEIGHBOURS = 3', 'PRECISION_RECALL_NEIGHBOURS = 4'),
    ('k-th neighbour counts the point itself', '.kthvalue(neighbours + 1, dim=1).values', '.kthvalue(neighbours, dim=1).values'),
    ('strictly inside the ball', '(torch.cdist(rows, centres) <= centre_radii)', '(torch.cdist(rows, centres) < centre_radii)'),
    ('precision and recall swapped', 'return share_inside(fake, real), share_inside(real, fake)',
     'return share_inside(real, fake), share_inside(fake, real)'),
    ('FID-64 in the 2048-d layer', 'measured = {names[0]: frechet_distance(real[0], fake[0])}',
     'measured = {names[0]: frechet_distance(real[-1], fake[-1])}'),
    ('FID-2048 in the 64-d layer', '{names[1]: frechet_distance(real[1], fake[1])', '{names[1]: frechet_distance(real[0], fake[0])'),
    ('precision and recall in the 64-d layer', 'precision, recall = precision_recall(real[1], fake[1])',
     'precision, recall = precision_recall(real[0], fake[0])'),
    ('--fid-2048 ignored', 'layers = (FID_FEATURE, STANDARD_FID_FEATURE) if cfg.fid_2048 else (FID_FEATURE,)', 'layers = (FID_FEATURE,)'),
    ('the 2048-d layer always computed', 'layers = (FID_FEATURE, STANDARD_FID_FEATURE) if cfg.fid_2048 else (FID_FEATURE,)',
     'layers = (FID_FEATURE, STANDARD_FID_FEATURE)'),
    ('test features not cached', 'real = cached(cache, lambda:', 'real = (lambda f: f())(lambda:'),
    ('radii of the wrong set', '        centre_radii = radii(centres)', '        centre_radii = radii(points)'),
    ('active at or above the threshold', 'return int((mu_variance > threshold).sum())', 'return int((mu_variance >= threshold).sum())'),
    ('threshold 0.005', 'ACTIVE_UNIT_VARIANCE = 0.01', 'ACTIVE_UNIT_VARIANCE = 0.005'),
    ('threshold 0.02', 'ACTIVE_UNIT_VARIANCE = 0.01', 'ACTIVE_UNIT_VARIANCE = 0.02'),
    ('stricter threshold 0.05 moved down', 'STRICTER_THRESHOLDS = (0.05, 0.1)', 'STRICTER_THRESHOLDS = (0.04, 0.1)'),
    ('stricter threshold 0.05 moved up', 'STRICTER_THRESHOLDS = (0.05, 0.1)', 'STRICTER_THRESHOLDS = (0.06, 0.1)'),
    ('stricter threshold 0.1 moved down', 'STRICTER_THRESHOLDS = (0.05, 0.1)', 'STRICTER_THRESHOLDS = (0.05, 0.09)'),
    ('stricter threshold 0.1 moved up', 'STRICTER_THRESHOLDS = (0.05, 0.1)', 'STRICTER_THRESHOLDS = (0.05, 0.2)'),
    ('participation ratio unsquared', 'return float(mu_variance.sum() ** 2 / mu_variance.pow(2).sum())',
     'return float(mu_variance.sum() / mu_variance.pow(2).sum())'),
    ('latent correlation signed', 'float((c.abs().sum() - c.diagonal().abs().sum()) / (dims * (dims - 1)))',
     'float((c.sum() - c.diagonal().sum()) / (dims * (dims - 1)))'),
    ('latent correlation with the diagonal', 'float((c.abs().sum() - c.diagonal().abs().sum()) / (dims * (dims - 1)))',
     'float(c.abs().sum() / (dims * dims))'),
    ('twin correlation off the diagonal', 'cross_correlation(z_gt, z_recon).diagonal() for z_gt, z_recon in pairs',
     'cross_correlation(z_gt, z_recon)[0] for z_gt, z_recon in pairs'),
    ('twin correlation of the first pair only', 'for z_gt, z_recon in pairs]).mean())', 'for z_gt, z_recon in pairs[:1]]).mean())'),
    ('twin correlation of the means: both pairs', 'None if bt_on == "z" else twin_correlation(pairs[:1])',
     'None if bt_on == "z" else twin_correlation(pairs)'),
    ('probe fitted on the test images', 'classifier.fit(train_features.double().numpy(), train_labels.numpy())',
     'classifier.fit(test_features.double().numpy(), test_labels.numpy())'),
    ('probe without standardising', 'make_pipeline(StandardScaler(), LogisticRegression(', 'make_pipeline(LogisticRegression('),
    ('mixture sample with L^T', '(self.cholesky[k] @ eps).squeeze(-1)', '(self.cholesky[k].transpose(1, 2) @ eps).squeeze(-1)'),
    ('mixture components uniform', 'k = torch.multinomial(self.weights, count', 'k = torch.multinomial(torch.ones_like(self.weights), count'),
    ('mixture not seeded', 'covariance_type="full", random_state=seed)', 'covariance_type="full")'),
    ('mixture diagonal covariance', 'covariance_type="full", random_state=seed)', 'covariance_type="diag", random_state=seed)'),
    ('9 components', 'MIXTURE_COMPONENTS = 10', 'MIXTURE_COMPONENTS = 9'),
    ('11 components', 'MIXTURE_COMPONENTS = 10', 'MIXTURE_COMPONENTS = 11'),
    ('encode_split in training mode', '    model.eval()\n    device = next(model.parameters()).device\n    means, pairs',
     '    device = next(model.parameters()).device\n    means, pairs'),
    ('latent metrics on the training means', '    metrics = {**unit_activity(test_mu.var(dim=0)),', '    metrics = {**unit_activity(train_mu.var(dim=0)),'),
    ('mixture sampler gets the prior', '        z = mixture.sample(count, generator)',
     '        z = torch.randn(count, model.architecture["latent_dim"], generator=generator)'),
]

DEVICES = [  # what only a GPU runs, against the tests on the stand-in GPU
    ('epoch sums read on the device', '(totals / seen).cpu().tolist()', '(totals / seen).tolist()'),
    ('pixel probe on device images', 'to_model_range(train_split.images.cpu()).flatten(1)', 'to_model_range(train_split.images).flatten(1)'),
    ('every saved GPU generator restored', 'checkpoint["cuda_rng"][:torch.cuda.device_count()]', 'checkpoint["cuda_rng"]'),
    ('every GPU generator restored into the first', 'torch.cuda.set_rng_state(state, index)', 'torch.cuda.set_rng_state(state, 0)'),
    ('no GPU generator saved', '"cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []', '"cuda_rng": []'),
    ('images moved when they fill a quarter of free memory', '< torch.cuda.mem_get_info(device)[0] // 4:',
     '<= torch.cuda.mem_get_info(device)[0] // 4:'),
    ('labels moved to the GPU', 'return [Split(s.images.to(device), s.labels) for s in splits]',
     'return [Split(s.images.to(device), s.labels.to(device) if s.labels is not None else None) for s in splits]'),
    ('channels_last on MPS', '    if device.type in ("cpu", "cuda"):\n        model.to(memory_format=torch.channels_last)',
     '    if True:\n        model.to(memory_format=torch.channels_last)'),
    ('no cuDNN benchmark', '        torch.backends.cudnn.benchmark = True\n', ''),
    ('freed memory returned to the system', '            mallopt(-3, 32 * 2**20), mallopt(-1, 2**30)\n', '            pass\n'),
]

HARNESS = [  # the command line, checkpoints and the records, against the tests outside the classes
    ('rate of the last epoch', 'best = history[training.best_epoch - 1]', 'best = history[-1]'),
    ('rate from the distortion', '"rate": best["val_kl"],', '"rate": best["val_recon"],'),
    ('distortion from the rate', '"reconstruction_error": best["val_recon"],', '"reconstruction_error": best["val_kl"],'),
    ('model.pt of every epoch', '        if training.best_epoch == training.epoch:\n            save_model', '        if True:\n            save_model'),
    ('no NaN check', 'if not all(math.isfinite(terms[k]) for terms', 'if False and all(math.isfinite(terms[k]) for terms'),
    ('torch generator not restored', '    torch.set_rng_state(checkpoint["torch_rng"])\n', ''),
    ('shuffle not restored', '    training.shuffle.set_state(checkpoint["shuffle_rng"])\n', ''),
    ('early stopping not restored', 'update(checkpoint["early_stopping"], epoch=', 'update(epoch='),
    ('epoch count not restored', 'update(checkpoint["early_stopping"], epoch=len(checkpoint["history"]),',
     'update(checkpoint["early_stopping"], epoch=0,'),
    ('finished not restored', 'for k in ("finished", "stopped_early")', 'for k in ("stopped_early",)'),
    ('a baseline in the VAE\'s default folder', '*baseline, f"seed', 'f"seed'),
    ('default settings named in the folder', 'if getattr(cfg, k) != DEFAULTS[k]]', 'if True]'),
    ('--evaluate: a setting the model file predates not its default', 'trained.get(k, DEFAULTS[k]) for', 'trained.get(k) for'),
    ('a setting the checkpoint predates not its default', '["settings"].get(k, DEFAULTS[k])', '["settings"].get(k)'),
    ('settings not compared on resume', '    if differing:\n        raise UsageError(f"--resume: {path.parent}',
     '    if False:\n        raise UsageError(f"--resume: {path.parent}'),
    ('no reseed before the latent metrics', '    torch.manual_seed(cfg.seed)  # the twins', '    pass  # the twins'),
    ('minimum of --lam1 not checked', 'MINIMUMS = {"lam1": 0, ', 'MINIMUMS = {'),
    ('NaN passes the minimums', 'and not getattr(cfg, name) >= minimum', 'and getattr(cfg, name) < minimum'),
    ('lock never taken', '        lock = hold(cfg.out)\n', ''),
    ('handlers not given back', '            signal.signal(signum, handler)\n', '            pass\n'),
]

MUTANTS = ([(*m, "test_btvae.py -k TestMethod or shapes or identities or overfit") for m in METHOD]
           + [(*m, "test_btvae.py -k TestExperiments") for m in EXPERIMENTS]
           + [(*m, "test_btvae.py -k gpu or cuda or mps or freed_activations") for m in DEVICES]
           + [(*m, "test_btvae.py -k not TestMethod and not TestExperiments") for m in HARNESS])


def run(name, line, mutated, tests, work):
    source = (PROJECT / "btvae.py").read_text()
    if source.count(line) != 1:
        return f"NOT APPLIED ({source.count(line)} matches: update this mutant to the current line)"
    shutil.copytree(PROJECT, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*", "results", "runs", "data"))
    (work / "btvae.py").write_text(source.replace(line, mutated))
    test_file, _, expression = tests.partition(" -k ")
    finished = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test_file,
                               "-k", expression], cwd=work, capture_output=True, text=True)
    if finished.returncode == 0:
        return "SURVIVED"
    failed = next((row for row in finished.stdout.splitlines() if row.startswith(("FAILED", "ERROR"))), "an error")
    return f"killed by {failed.split(' ', 1)[-1].split(' - ')[0]}"


def main():
    chosen = [int(arg) for arg in sys.argv[1:]] or range(len(MUTANTS))
    outcomes = []
    with tempfile.TemporaryDirectory() as folder:
        for number in chosen:
            name, line, mutated, tests = MUTANTS[number]
            start = time.perf_counter()
            outcomes.append(run(name, line, mutated, tests, Path(folder)))
            print(f"[{number}] {name}: {outcomes[-1]} ({time.perf_counter() - start:.0f} s)", flush=True)
    survived = sum(not outcome.startswith("killed") for outcome in outcomes)
    print(f"{len(outcomes) - survived} of {len(outcomes)} mutants killed")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
