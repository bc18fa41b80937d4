"""FID, KID and the held-out scores of the families (VAE reconstruction error, pix2pix inpainting,
CycleGAN translation, attribute classification), computed across ranks.

Every call is collective. Sample i of the generated set comes from noise row i of one seeded
tensor, each rank generates and embeds a contiguous share, and the features are gathered in
sample order, so the statistics do not depend on the number of ranks. Generated images are
quantised to uint8 levels like the real ones (and like a PNG on disk) before Inception.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from gendist import distributed
from gendist.config import RunConfig
from gendist.data.domains import domain_signs
from gendist.data.loader import domain_split, read_attributes, read_in_order
from gendist.data.masks import eval_keys, mask_batch
from gendist.data.resolution import bicubic_upsample, downsample
from gendist.data.shards import read_manifest
from gendist.eval import reference as ref_cache
from gendist.eval.attributes import agreement_scores, hits, undefined_balanced
from gendist.eval.inception import FidInception, weights_id
from gendist.eval.inpainting import PROTOCOL as INPAINTING_PROTOCOL
from gendist.eval.inpainting import from_uint8_hwc, inpainting_metrics, mean_fill, quantize, telea_fill
from gendist.eval.judge import Judge, Judged, JudgedSets, load_judge
from gendist.eval.metrics import feature_statistics, frechet_distance, kernel_inception_distance, psd_sqrt
from gendist.eval.precision_recall import PROTOCOL as PRECISION_RECALL_PROTOCOL
from gendist.eval.precision_recall import precision_recall
from gendist.eval.super_resolution import PROTOCOL as SR_PROTOCOL
from gendist.eval.super_resolution import SR_METHODS, SR_METRICS, sr_metrics
from gendist.families.base import (
    Classify,
    Complete,
    Encode,
    Generate,
    Reconstruct,
    Sampling,
    SuperResolve,
    Translate,
)
from gendist.progress import append_jsonl, read_jsonl

EVAL_LOG = "eval.jsonl"
INPAINTING_METHODS = ("model", "telea", "mean_fill")  # the family's completion, then the in-run baselines
INPAINTING_METRICS = ("psnr", "ssim", "l1_hole")
# what a log line shows of an evaluation row
SHOWN = (
    "fid",
    "kid",
    "kid_std",
    "precision",
    "recall",
    "kid_fitted",  # fid_fitted is shown with the fid_ prefixes
    "fd_face",
    "cond_attr_mean_accuracy",
    "cond_attr_mean_accuracy_shuffled",
    "recon_mse",
    "psnr_model",
    "psnr_telea",
    "psnr_mean_fill",
    "completed_fid",
    "psnr_y_model",
    "psnr_y_bicubic",
    "ssim_y_model",
    "ssim_y_bicubic",
    "sr_model_fid",
    "sr_bicubic_fid",
    "attr_mean_accuracy",
    "attr_mean_accuracy_majority",
    "attr_mean_balanced_accuracy",
    "attr_mean_balanced_accuracy_majority",
)
PROTOCOL = "pytorch-fid InceptionV3 pool3 (2048-d), bilinear resize to 299x299, images quantised to uint8"
EX_POST_PROTOCOL = (
    "*_fitted: the same FID/KID protocol, on eval.num_samples samples decoded from N(m, C), the Gaussian fitted "
    "(maximum likelihood, + 1e-6 I) to the codes of the first eval.num_real images of data.split, drawn as m + L z "
    "with the evaluation's seeded z and C = L L' (the ex-post density of Ghosh et al. 2020)"
)
TRANSLATION_PROTOCOL = (
    "the first eval.recon_images images of each source domain's eval.recon_split.SRC split, translated "
    "(outputs quantised to uint8); FID/KID of the translations against the eval.split.DST reference, next to "
    "the untranslated sources' (_identity: what a translator that changes nothing scores, measured once per "
    "process); cycle_l1_SRC: mean |back(forward(x)) - x| per pixel in [0, 1], forward(x) quantised before it "
    "is translated back"
)
ATTRIBUTE_PROTOCOL = (
    "the first eval.recon_images images of eval.recon_split (shard order) with their labels; an attribute is "
    "predicted present where its logit > 0; per attribute, accuracy and balanced accuracy (TPR + TNR) / 2, "
    "the latter undefined (null) where the held-out images hold one class only and left out of its mean "
    "(attr_balanced_undefined names those); means are unweighted over the attributes; _majority: always "
    "predicting each attribute's majority value in data.split (ties: absent), scored on the same images "
    "(a constant's balanced accuracy is 0.5 wherever defined)"
)
JUDGE_PROTOCOL = (
    "the face classifier eval.classifier (judge: its run, step and preprocessing); fd_face: Frechet distance "
    "of its pooled features (judge.feature_dim-d) of the generated images against the same reference images "
    "as FID, in a space trained on faces: NOT comparable with FID or any published number; precision_face / "
    "recall_face: the precision/recall protocol in those features; cond_attr_*: a conditional generator's "
    "samples judged against the labels they were generated with (attribute present where its logit > 0), next "
    "to the judge on the real reference images with their own labels (_real: what a perfect generator would "
    "score, the judge's own error included) and the same predictions against the labels of the next sample "
    "(_shuffled: what a generator ignoring its labels scores); flip_rate_SRC_to_DST: the share of translations "
    "the judge puts in DST (every domain attribute on its DST side), _identity: the untranslated sources'; "
    "kept_SRC_to_DST: the share of (image, other judged attribute) pairs whose prediction the translation kept"
)
# a one-line summary also shows each translation direction's FID, its identity baseline and the cycle error
SHOWN_TRANSLATION_PREFIXES = ("fid_", "cycle_l1_", "flip_rate_")


def shown_keys(row: dict) -> list[str]:
    """The numbers a one-line summary of an evaluation row shows, in order."""
    return [k for k in SHOWN if row.get(k) is not None] + [k for k in row if k.startswith(SHOWN_TRANSLATION_PREFIXES)]


def quantised(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> [0, 1] on the 256 levels a saved image would have."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 255


def unit_range(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N,H,W,3 -> float N,3,H,W in [0, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255


class Timer:
    """Seconds per phase; synchronises CUDA so GPU work is charged to the phase that ran it."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class Evaluator:
    def __init__(self, cfg: RunConfig, accelerator: Accelerator, shard_dir: str) -> None:
        self.cfg, self.accelerator, self.shard_dir = cfg, accelerator, shard_dir
        self.device = accelerator.device
        self.stats_dir = cfg.eval.stats_dir or str(Path(cfg.data.cache_dir).expanduser() / "fid_stats")
        self._inception: FidInception | None = None
        self._references: dict[str, ref_cache.Reference] = {}  # by split: eval.split's, a translation target's
        # by split: held-out images and their attributes, or why there are none
        self._held_out: dict[str, tuple[np.ndarray, np.ndarray] | str] = {}
        self._fit_images: np.ndarray | None = None  # the training images whose codes the ex-post Gaussian fits
        self._training_positives: tuple[np.ndarray, int] | None = None  # per attribute of data.split, of images
        # (source, target) -> the untranslated sources' FID/KID (rank 0; {} elsewhere): they never change
        self._identity: dict[tuple[str, str], dict] = {}
        self._judge: Judge | None = None
        self._judged_references: dict[str, Judged] = {}
        self._shared_features: dict[
            str, np.ndarray
        ] = {}  # by reference key: its features on every rank  # by split: the judge's outputs of its reference images

    @property
    def judge(self) -> Judge | None:
        """The face judge of eval.classifier, loaded at first use; None where none is configured."""
        if self.cfg.eval.classifier and self._judge is None:
            preprocessing = read_manifest(self.shard_dir)["preprocessing"]
            self._judge = load_judge(self.cfg.eval.classifier, self.device, preprocessing)
        return self._judge

    @property
    def inception(self) -> FidInception:
        if self._inception is None:
            net = FidInception(self.cfg.eval.inception_weights)
            self._inception = net.to(self.device, memory_format=torch.channels_last)
        return self._inception

    def _share(self, total: int) -> tuple[int, int]:
        return distributed.chunk_bounds(total, self.accelerator.process_index, self.accelerator.num_processes)

    # -- the real side -------------------------------------------------------------------------
    def reference(self, timer: Timer | None = None, split: str | None = None) -> ref_cache.Reference:
        """The real statistics of the first eval.num_real images of `split` (default eval.split; a
        translation's target domain): from the cache when present, else computed by all ranks and cached."""
        ev = self.cfg.eval
        split = split or ev.split
        if split in self._references:
            return self._references[split]
        key, described = ref_cache.describe(self.shard_dir, split, ev.num_real, weights_id(ev.inception_weights))
        path = ref_cache.cache_path(self.stats_dir, self.shard_dir, split, described["images"], key)
        cached = distributed.broadcast_from_main(self.accelerator, path.is_file())
        reference = ref_cache.load(path, key) if cached and self.accelerator.is_main_process else None
        if not cached:
            reference = self._build_reference(split, key, described, path, timer or Timer(self.device))
        # Only rank 0 computes distances; the others need the attributes (labels) and the description.
        shared = distributed.broadcast_from_main(
            self.accelerator,
            None if reference is None else (reference.attrs, reference.description, str(reference.path)),
        )
        if reference is None:
            empty = np.zeros(0)
            reference = ref_cache.Reference(empty, empty, empty, empty, shared[0], key, Path(shared[2]), shared[1])
        self._references[split] = reference
        return reference

    def _build_reference(
        self, split: str, key: str, described: dict, path: Path, timer: Timer
    ) -> ref_cache.Reference | None:
        """Embed the reference images on all ranks; rank 0 computes, caches and returns the statistics."""
        ev = self.cfg.eval
        distributed.rank_print(
            self.accelerator,
            f"FID reference: embedding {described['images']} '{split}' images "
            f"of {self.shard_dir} once; cached at {path}",
        )
        images, attrs, _ = read_in_order(self.shard_dir, split, self.cfg.model.image_size, ev.num_real)
        (gathered,) = self._embedded(
            len(images),
            lambda i, stop: (unit_range(images[i:stop], self.device),),
            timer,
            phases=("reference_features", "reference_features"),
        )
        if not self.accelerator.is_main_process:
            return None
        with timer.phase("reference_statistics"):
            mu, sigma = feature_statistics(gathered)
            reference = ref_cache.Reference(mu, sigma, psd_sqrt(sigma), gathered, attrs, key, path, described)
        ref_cache.save(reference)
        return reference

    def _gather(self, features: list[torch.Tensor], total: int) -> np.ndarray:
        local = torch.cat(features) if features else torch.zeros(0, 2048, device=self.device)
        return distributed.gather_rows(self.accelerator, local, total).numpy()

    def _embedded(
        self,
        total: int,
        produce: Callable[[int, int], Sequence[torch.Tensor]],
        timer: Timer,
        sets: int = 1,
        phases: tuple[str, str] = ("features", "gather"),
    ) -> list[np.ndarray]:
        """Inception features of `sets` image sets of `total` images each, made batch by batch over this
        rank's share: produce(start, stop) -> one batch in [0, 1] per set, of images start..stop-1.
        Each set's features come back gathered in image order, on every rank."""
        start, end = self._share(total)
        features: list[list[torch.Tensor]] = [[] for _ in range(sets)]
        for i in range(start, end, self.cfg.eval.batch_size):
            batches = produce(i, min(i + self.cfg.eval.batch_size, end))
            with timer.phase(phases[0]):
                for found, images in zip(features, batches, strict=True):
                    found.append(self.inception(images))
        with timer.phase(phases[1]):
            return [self._gather(found, total) for found in features]

    # -- the generated side --------------------------------------------------------------------
    def evaluate_sampling(self, sampling: Sampling, step: int) -> dict:
        """`evaluate` with what a family's Sampling says to score (training and gendist eval alike)."""
        return self.evaluate(
            sampling.generate,
            step,
            sampling.label,
            sampling.reconstruct,
            sampling.complete,
            sampling.translate,
            sampling.classify,
            sampling.classify_attributes,
            sampling.conditioned_on,
            sampling.super_resolve,
            sampling.encode,
        )

    def evaluate(
        self,
        generate: Generate | None,
        step: int,
        generator_label: str,
        reconstruct: Reconstruct | None = None,
        complete: Complete | None = None,
        translate: dict[tuple[str, str], Translate] | None = None,
        classify: Classify | None = None,
        classify_attributes: list[str] | None = None,
        conditioned_on: list[str] | None = None,
        super_resolve: SuperResolve | None = None,
        encode: Encode | None = None,
    ) -> dict:
        """One evaluation; returns the row (on every rank) that rank 0 appends to eval.jsonl."""
        timer = Timer(self.device)
        # eval.split's statistics serve the noise samples and the completions; a translation family
        # is scored against its target domains' statistics only, a classifier against labels
        needs_reference = generate is not None or complete is not None or super_resolve is not None
        reference = self.reference(timer) if needs_reference else None
        row: dict = {}
        if generate is not None:
            row.update(self._generated(generate, reference, timer, conditioned_on))
        if generate is not None and encode is not None:
            row.update(self._ex_post(generate, encode, reference, timer))
        if reconstruct is not None:
            row.update(self._reconstruction(reconstruct, timer))
        if complete is not None:
            row.update(self._inpainting(complete, reference, timer))
        if translate:
            row.update(self._translations(translate, timer))
        if classify is not None:
            row.update(self._attributes(classify, classify_attributes or [], timer))
        if super_resolve is not None:
            row.update(self._super_resolution(super_resolve, reference, step, timer))
        row = distributed.broadcast_from_main(self.accelerator, row)
        if reference is None and not translate:  # labels only: no Inception, no reference statistics
            protocol = self.label_protocol(generator_label, row.get("attr_images", 0))
        elif reference is None:  # the target domains' references, and the translations scored against them
            translated = list(row["translation_images"].values())
            references = [self.reference(timer, split) for split in self._targets(translate)]
            protocol = self.protocol(references, generator_label, sum(translated), translated)
        else:
            samples = self.cfg.eval.num_samples
            protocol = self.protocol([reference], generator_label, samples if generate is not None else 0, [samples])
        return {
            "step": step,
            "ranks": self.accelerator.num_processes,
            **row,
            "seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
            "protocol": protocol,
        }

    def _generated(
        self,
        generate: Generate,
        reference: ref_cache.Reference,
        timer: Timer,
        conditioned_on: list[str] | None = None,
        judge: bool = True,
    ) -> dict:
        """FID and KID of `eval.num_samples` generated images (rank 0), their precision and recall
        (eval.pr_k), and with a judge (eval.classifier; `judge` off leaves it out) the face-feature
        scores (JUDGE_PROTOCOL)."""
        ev = self.cfg.eval
        noise = torch.randn(ev.num_samples, self.cfg.model.z_dim, generator=torch.Generator().manual_seed(ev.seed))
        label_rows = np.arange(ev.num_samples) % reference.count
        labels = torch.from_numpy(reference.attrs[label_rows]).float()
        judged = JudgedSets(self.judge, self.accelerator) if self.judge and judge else None

        def produce(i: int, stop: int) -> tuple[torch.Tensor]:
            with timer.phase("generate"), torch.no_grad():
                images = quantised(generate(noise[i:stop].to(self.device), labels[i:stop].to(self.device)))
            if judged is not None:
                with timer.phase("judge"):
                    judged.add("generated", images)
            return (images,)

        (generated,) = self._embedded(ev.num_samples, produce, timer)
        row = self._distances(generated, reference, timer) if self.accelerator.is_main_process else {}
        if ev.pr_k:
            with timer.phase("precision_recall"):
                row.update(precision_recall(self.accelerator, self._features_everywhere(reference), generated, ev.pr_k))
            row["precision_recall_protocol"] = {"k": ev.pr_k, "features": "FID's", "text": PRECISION_RECALL_PROTOCOL}
        if judged is not None:
            samples = judged.gathered(["generated"], ev.num_samples)["generated"]
            row.update(self._judged_samples(samples, reference, label_rows, conditioned_on or [], timer))
        return row

    def _ex_post(self, generate: Generate, encode: Encode, reference: ref_cache.Reference, timer: Timer) -> dict:
        """The scores of samples decoded from a Gaussian fitted to the codes of training images
        (EX_POST_PROTOCOL): `<score>_fitted` beside the N(0, I) prior's."""
        mean, factor, count = self._fitted_gaussian(encode, timer)

        def from_fitted(z: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
            return generate(mean + z @ factor.T, attrs)

        scored = self._generated(from_fitted, reference, timer, judge=False)
        row = {
            f"{key}_fitted": scored[key] for key in ("fid", "kid", "kid_std", "precision", "recall") if key in scored
        }
        row["fitted_prior"] = {"codes": count, "split": self.cfg.data.split, "text": EX_POST_PROTOCOL}
        return row

    def _fitted_gaussian(self, encode: Encode, timer: Timer) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean and Cholesky factor of the codes of the first eval.num_real images of data.split,
        encoded across the ranks and summed in float64."""
        ev = self.cfg.eval
        if self._fit_images is None:  # read once per process, as the held-out images are
            split, size = self.cfg.data.split, self.cfg.model.image_size
            self._fit_images = read_in_order(self.shard_dir, split, size, ev.num_real)[0]
        images = self._fit_images
        start, end = self._share(len(images))
        z_dim = self.cfg.model.z_dim
        sums = torch.zeros(z_dim + 1, z_dim, dtype=torch.float64, device=self.device)  # row 0: the sum; then x'x
        with timer.phase("fit_codes"), torch.no_grad():
            for i in range(start, end, ev.batch_size):
                codes = encode(unit_range(images[i : min(i + ev.batch_size, end)], self.device) * 2 - 1).double()
                sums[0] += codes.sum(dim=0)
                sums[1:] += codes.T @ codes
        sums = distributed.sum_across_ranks(self.accelerator, sums)
        mean = sums[0] / len(images)
        covariance = sums[1:] / len(images) - torch.outer(mean, mean)
        # a small ridge keeps the factor defined when the codes span fewer than z_dim directions
        ridge = 1e-6 * torch.eye(z_dim, dtype=torch.float64, device=self.device)
        factor = torch.linalg.cholesky((covariance + covariance.T) / 2 + ridge)
        return mean.float(), factor.float(), len(images)

    def _features_everywhere(self, reference: ref_cache.Reference) -> np.ndarray:
        """The reference's Inception features on every rank (rank 0 alone loads them), sent once."""
        if reference.key not in self._shared_features:
            main = self.accelerator.is_main_process
            self._shared_features[reference.key] = distributed.broadcast_rows(
                self.accelerator, reference.features if main else None
            )
        return self._shared_features[reference.key]

    def _judged_reference(self, split: str, count: int, timer: Timer) -> Judged:
        """The judge's outputs of the first `count` images of `split` (as the FID reference reads
        them), made across ranks once per process."""
        if split not in self._judged_references:
            images, _, _ = read_in_order(self.shard_dir, split, self.cfg.model.image_size, count)
            judged = JudgedSets(self.judge, self.accelerator)
            start, end = self._share(len(images))
            with timer.phase("judge_reference"):
                for i in range(start, end, self.cfg.eval.batch_size):
                    judged.add(split, unit_range(images[i : min(i + self.cfg.eval.batch_size, end)], self.device))
                self._judged_references[split] = judged.gathered([split], len(images))[split]
        return self._judged_references[split]

    def _judged_samples(
        self,
        samples: Judged,
        reference: ref_cache.Reference,
        label_rows: np.ndarray,
        conditioned_on: list[str],
        timer: Timer,
    ) -> dict:
        """fd_face and precision/recall in the judge's features against the FID reference images, and
        for a conditional generator the attributes it was asked for, judged (JUDGE_PROTOCOL)."""
        ev, judge = self.cfg.eval, self.judge
        real = self._judged_reference(reference.description["split"], reference.count, timer)
        row: dict = {"judge": judge.source, "judge_protocol": JUDGE_PROTOCOL}
        if self.accelerator.is_main_process:
            with timer.phase("fd_face"):
                mu_real, sigma_real = feature_statistics(real.features)
                mu, sigma = feature_statistics(samples.features)
                row["fd_face"] = frechet_distance(mu_real, sigma_real, mu, sigma)
        if ev.pr_k:
            with timer.phase("precision_recall"):
                scores = precision_recall(self.accelerator, real.features, samples.features, ev.pr_k)
            row.update({f"{name}_face": value for name, value in scores.items()})
        if conditioned_on:
            row.update(self._conditioned(samples, real, reference.attrs, label_rows, conditioned_on))
        return row

    def _conditioned(
        self, samples: Judged, real: Judged, attrs: np.ndarray, label_rows: np.ndarray, conditioned_on: list[str]
    ) -> dict:
        """A conditional generator's samples judged against the labels they were made with, next to the
        judge on the real images with their labels and against the next sample's labels."""
        available = read_manifest(self.shard_dir)["attribute_names"]
        names = [name for name in conditioned_on if name in self.judge.attributes]
        row: dict = {"cond_attr_unjudged": [name for name in conditioned_on if name not in names]}
        if not names:
            return row
        data_columns = [available.index(name) for name in names]
        judge_columns = [self.judge.attributes.index(name) for name in names]
        asked = attrs[label_rows][:, data_columns] > 0
        said = samples.logits[:, judge_columns] > 0
        shuffled = np.roll(asked, 1, axis=0)
        truth = attrs[:, data_columns] > 0
        for predicted, wanted, suffix in (
            (said, asked, ""),
            (real.logits[:, judge_columns] > 0, truth, "_real"),
            (said, shuffled, "_shuffled"),
        ):
            true_positives, true_negatives = hits(predicted, wanted)
            row.update(
                agreement_scores(
                    true_positives, true_negatives, wanted.sum(axis=0), len(wanted), names, "cond_attr", suffix
                )
            )
        return row

    def _distances(
        self, features: np.ndarray, reference: ref_cache.Reference, timer: Timer, prefix: str = "", suffix: str = ""
    ) -> dict:
        """FID and KID of a gathered feature set against the reference (rank 0): keys {prefix}fid{suffix}, ..."""
        ev = self.cfg.eval
        with timer.phase("statistics"):
            mu, sigma = feature_statistics(features)
        with timer.phase("frechet"):
            fid = frechet_distance(reference.mu, reference.sigma, mu, sigma, reference.sqrt_sigma)
        with timer.phase("kid"):
            kid, kid_std = kernel_inception_distance(
                reference.features, features, ev.kid_subsets, ev.kid_subset_size, ev.seed
            )
        return {f"{prefix}{name}{suffix}": value for name, value in (("fid", fid), ("kid", kid), ("kid_std", kid_std))}

    def _inpainting(self, complete: Complete, reference: ref_cache.Reference, timer: Timer) -> dict:
        """Held-out images with fixed seeded masks (one per image index, whatever the ranks), completed
        by the model and by the classical baselines, all scored alike (eval.inpainting.PROTOCOL):
        PSNR and SSIM over the whole image, L1 inside the hole; FID/KID of the model's completions."""
        images = self._held_out_images()
        if isinstance(images, str):
            return {"inpainting_skipped": images}
        ev, size = self.cfg.eval, self.cfg.model.image_size
        masks = mask_batch(self.cfg.pix2pix.mask, size, ev.seed, eval_keys(range(len(images))))
        sums = torch.zeros(len(INPAINTING_METHODS), len(INPAINTING_METRICS), dtype=torch.float64, device=self.device)

        def produce(i: int, stop: int) -> tuple[torch.Tensor]:
            real, mask = unit_range(images[i:stop], self.device), masks[i:stop].to(self.device)
            with timer.phase("complete"), torch.no_grad():
                completed = quantised(complete(real * 2 - 1, mask))
            with timer.phase("baselines"):
                telea = from_uint8_hwc(telea_fill(images[i:stop], masks[i:stop, 0].numpy())).to(self.device)
                mean = quantize(mean_fill(real, mask))
            with timer.phase("inpainting_metrics"):
                for row, output in enumerate((completed, telea, mean)):
                    scores = inpainting_metrics(output, real, mask)
                    sums[row] += torch.stack([scores[name].double().sum() for name in INPAINTING_METRICS])
            return (completed,)

        (gathered,) = self._embedded(len(images), produce, timer)
        totals = distributed.sum_across_ranks(self.accelerator, sums) / len(images)
        row: dict = {
            f"{metric}_{method}": value
            for method, values in zip(INPAINTING_METHODS, totals.tolist())
            for metric, value in zip(INPAINTING_METRICS, values)
        }
        row.update(
            inpainting_images=len(images),
            inpainting_split=ev.recon_split,
            inpainting_masks=self.cfg.pix2pix.mask,
            inpainting_protocol=INPAINTING_PROTOCOL,
        )
        if self.accelerator.is_main_process:
            row.update(self._distances(gathered, reference, timer, prefix="completed_"))
        return row

    def _super_resolution(
        self, super_resolve: SuperResolve, reference: ref_cache.Reference, step: int, timer: Timer
    ) -> dict:
        """Held-out images downsampled srgan.scale times, super-resolved by the model and upsampled
        bicubically, both scored alike (eval.super_resolution.PROTOCOL): PSNR and SSIM on Y and RGB
        against the originals, FID/KID against the eval.split reference."""
        images = self._held_out_images()
        if isinstance(images, str):
            return {"super_resolution_skipped": images}
        scale = self.cfg.srgan.scale
        sums = torch.zeros(len(SR_METHODS), len(SR_METRICS), dtype=torch.float64, device=self.device)

        def produce(i: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            real = unit_range(images[i:stop], self.device)
            low = downsample(real * 2 - 1, scale)
            with timer.phase("super_resolve"), torch.no_grad():
                outputs = (quantised(super_resolve(low)), quantised(bicubic_upsample(low, scale)))
            with timer.phase("super_resolution_metrics"):
                for row, output in enumerate(outputs):
                    scores = sr_metrics(output, real, scale)
                    sums[row] += torch.stack([scores[name].double().sum() for name in SR_METRICS])
            return outputs

        embedded = self._embedded(len(images), produce, timer, sets=len(SR_METHODS))
        totals = distributed.sum_across_ranks(self.accelerator, sums) / len(images)
        row: dict = {
            f"{metric}_{method}": value
            for method, values in zip(SR_METHODS, totals.tolist())
            for metric, value in zip(SR_METRICS, values)
        }
        pretrain_steps = self.cfg.srgan.pretrain_steps
        row.update(
            sr_stage="SRResNet (pixel loss)" if step <= pretrain_steps else "SRGAN (adversarial)",
            sr_scale=scale,
            sr_images=len(images),
            sr_split=self.cfg.eval.recon_split,
            sr_protocol=SR_PROTOCOL,
        )
        if self.accelerator.is_main_process:
            for method, features in zip(SR_METHODS, embedded):
                row.update(self._distances(features, reference, timer, prefix=f"sr_{method}_"))
        return row

    def _held_out_set(self, split: str | None = None) -> tuple[np.ndarray, np.ndarray] | str:
        """The first eval.recon_images images of `split` (default eval.recon_split) and their attributes
        (N, A, +-1), read once per run; or why there are none."""
        ev = self.cfg.eval
        split = split or ev.recon_split
        if split not in self._held_out:
            try:
                images, attrs, _ = read_in_order(self.shard_dir, split, self.cfg.model.image_size, ev.recon_images)
                self._held_out[split] = images, attrs
            except ValueError as err:  # e.g. a dataset without a held-out split: say so in the row
                self._held_out[split] = str(err)
        return self._held_out[split]

    def _held_out_images(self, split: str | None = None) -> np.ndarray | str:
        held_out = self._held_out_set(split)
        return held_out if isinstance(held_out, str) else held_out[0]

    def _reconstruction(self, reconstruct: Reconstruct, timer: Timer) -> dict:
        """Mean squared error per pixel (values in [0, 1]) of reconstructions of held-out images."""
        ev = self.cfg.eval
        images = self._held_out_images()
        if isinstance(images, str):
            return {"recon_skipped": images}
        start, end = self._share(len(images))
        squared = torch.zeros((), dtype=torch.float64, device=self.device)
        with timer.phase("reconstruction"), torch.no_grad():
            for i in range(start, end, ev.batch_size):
                real = unit_range(images[i : min(i + ev.batch_size, end)], self.device)
                recon = quantised(reconstruct(real * 2 - 1))
                squared += (recon - real).double().pow(2).sum()
        total = distributed.sum_across_ranks(self.accelerator, squared).item()
        return {"recon_mse": total / images.size, "recon_images": len(images), "recon_split": ev.recon_split}

    # -- attribute classification --------------------------------------------------------------
    def training_positives(self) -> tuple[np.ndarray, int]:
        """Per attribute of the data (manifest order), the images of data.split labelled present, and
        the images counted: read once per process from the shards' attribute members alone (the
        images are seeked over); unreadable samples are left out."""
        if self._training_positives is None:
            rows = read_attributes(self.shard_dir, self.cfg.data.split, strict=False)
            self._training_positives = (rows > 0).sum(axis=0).astype(np.int64), len(rows)
        return self._training_positives

    def _attributes(self, classify: Classify, names: list[str], timer: Timer) -> dict:
        """Accuracy and balanced accuracy of `classify` on the held-out images' labels, next to the
        majority baseline (ATTRIBUTE_PROTOCOL); the held-out images are split over the ranks and the
        counts summed."""
        ev = self.cfg.eval
        held_out = self._held_out_set()
        if isinstance(held_out, str):
            return {"attr_skipped": held_out}
        images, attrs = held_out
        available = read_manifest(self.shard_dir)["attribute_names"]
        missing = [name for name in names if name not in available]
        if missing or not names:
            raise ValueError(f"the classifier predicts {missing or 'no attributes'}; {self.shard_dir} has: {available}")
        truth = attrs[:, [available.index(name) for name in names]] > 0
        start, end = self._share(len(images))
        hits = torch.zeros(2, len(names), dtype=torch.float64, device=self.device)  # true positives, negatives
        with timer.phase("classify"), torch.no_grad():
            for i in range(start, end, ev.batch_size):
                stop = min(i + ev.batch_size, end)
                logits = classify(unit_range(images[i:stop], self.device) * 2 - 1)
                if logits.shape != (stop - i, len(names)):
                    raise ValueError(f"classify gave logits of {tuple(logits.shape)} for {stop - i} images, {names}")
                predicted, present = logits > 0, torch.from_numpy(truth[i:stop]).to(self.device)
                hits[0] += (predicted & present).sum(dim=0)
                hits[1] += (~predicted & ~present).sum(dim=0)
        true_positives, true_negatives = distributed.sum_across_ranks(self.accelerator, hits).cpu().numpy()
        positives = truth.sum(axis=0).astype(np.float64)
        train_positives, train_images = self.training_positives()
        majority = train_positives[[available.index(name) for name in names]] * 2 > train_images
        count = len(truth)
        row = {
            **agreement_scores(true_positives, true_negatives, positives, count, names),
            **agreement_scores(
                np.where(majority, positives, 0.0),
                np.where(majority, 0.0, count - positives),
                positives,
                count,
                names,
                suffix="_majority",
            ),
            "attr_positive_rate": dict(zip(names, map(float, positives / count))),
            "attr_train_positive_rate": dict(
                zip(names, (float(train_positives[available.index(name)] / train_images) for name in names))
            ),
            "attr_images": count,
            "attr_split": ev.recon_split,
            "attr_majority_split": self.cfg.data.split,
            "attr_majority_images": train_images,
            "attr_protocol": ATTRIBUTE_PROTOCOL,
        }
        undefined = undefined_balanced(positives, count, names)
        if undefined:
            row["attr_balanced_undefined"] = undefined
        return row

    # -- translation ---------------------------------------------------------------------------
    def _targets(self, translate: dict[tuple[str, str], Translate]) -> list[str]:
        """The reference splits of the translations' target domains, each once."""
        return list(dict.fromkeys(domain_split(self.cfg.eval.split, dst) for _, dst in translate))

    def _translations(self, translate: dict[tuple[str, str], Translate], timer: Timer) -> dict:
        """Each direction's scores (see TRANSLATION_PROTOCOL), what they were measured on, and the
        directions skipped for want of held-out source images."""
        ev = self.cfg.eval
        row: dict = {}
        images: dict[str, int] = {}
        splits: dict[str, dict[str, str]] = {}
        skipped: dict[str, str] = {}
        for src, dst in translate:
            direction = f"{src}_to_{dst}"
            splits[direction] = {"source": domain_split(ev.recon_split, src), "reference": domain_split(ev.split, dst)}
            scores = self._translation(src, dst, translate[(src, dst)], translate.get((dst, src)), timer)
            if isinstance(scores, str):
                skipped[direction] = scores
            else:
                images[direction] = scores.pop("images")
                row.update(scores)
        row.update(translation_images=images, translation_splits=splits, translation_protocol=TRANSLATION_PROTOCOL)
        if self.judge is not None:
            row.update(judge=self.judge.source, judge_protocol=JUDGE_PROTOCOL)
        if skipped:
            row["translation_skipped"] = skipped
        return row

    def _translation(self, src: str, dst: str, forward: Translate, back: Translate | None, timer: Timer) -> dict | str:
        """One direction: FID/KID of the held-out `src` images translated `forward`, and of the same
        images untranslated (measured at the first evaluation), against `dst`'s reference (rank 0); the
        cycle error where the way `back` is given (all ranks). Or why the direction cannot be scored."""
        ev = self.cfg.eval
        reference = self.reference(timer, domain_split(ev.split, dst))
        images = self._held_out_images(domain_split(ev.recon_split, src))
        if isinstance(images, str):
            return images
        if len(images) < 2:
            return f"'{domain_split(ev.recon_split, src)}' holds {len(images)} image: FID and KID need at least 2"
        errors = torch.zeros((), dtype=torch.float64, device=self.device)
        baseline = (src, dst) not in self._identity  # the same decision on every rank

        judged = JudgedSets(self.judge, self.accelerator) if self.judge else None

        def produce(i: int, stop: int) -> tuple[torch.Tensor, ...]:
            real = unit_range(images[i:stop], self.device)
            with timer.phase("translate"), torch.no_grad():
                translated = quantised(forward(real * 2 - 1))
                if back is not None:
                    errors.add_((quantised(back(translated * 2 - 1)) - real).abs().double().sum())
            if judged is not None:
                with timer.phase("judge"):
                    judged.add("translated", translated)
                    judged.add("source", real)
            return (translated, real) if baseline else (translated,)

        features = self._embedded(len(images), produce, timer, sets=2 if baseline else 1)
        cycle = distributed.sum_across_ranks(self.accelerator, errors).item() / images.size
        scores: dict = {"images": len(images)}
        main = self.accelerator.is_main_process
        if baseline:
            suffix = f"_{src}_to_{dst}_identity"
            self._identity[(src, dst)] = self._distances(features[1], reference, timer, suffix=suffix) if main else {}
        if main:
            scores.update(self._distances(features[0], reference, timer, suffix=f"_{src}_to_{dst}"))
            scores.update(self._identity[(src, dst)])
        if back is not None:
            scores[f"cycle_l1_{src}"] = cycle
        if judged is not None:
            sets = judged.gathered(["translated", "source"], len(images))
            scores.update(self._judged_translation(src, dst, sets["translated"], sets["source"]))
        return scores

    def _judged_translation(self, src: str, dst: str, translated: Judged, source: Judged) -> dict:
        """How often the judge puts the translations (and the untranslated sources) in `dst`, and how
        many of the other attributes' predictions the translation kept (JUDGE_PROTOCOL)."""
        signs = domain_signs(read_manifest(self.shard_dir), dst)
        attributes = self.judge.attributes
        unjudged = [name for name in signs if name not in attributes]
        if unjudged:
            return {f"flip_rate_{src}_to_{dst}_skipped": f"the judge does not predict {', '.join(unjudged)}"}
        columns = [attributes.index(name) for name in signs]
        wanted = np.array([signs[name] > 0 for name in signs])
        others = [i for i, name in enumerate(attributes) if name not in signs]

        def in_target(judged: Judged) -> float:
            return float(((judged.logits[:, columns] > 0) == wanted).all(axis=1).mean())

        row = {
            f"flip_rate_{src}_to_{dst}": in_target(translated),
            f"flip_rate_{src}_to_{dst}_identity": in_target(source),
        }
        if others:
            kept = (translated.logits[:, others] > 0) == (source.logits[:, others] > 0)
            row[f"kept_{src}_to_{dst}"] = float(kept.mean())
        return row

    def label_protocol(self, generator_label: str, images: int) -> dict:
        """What a row scored against labels alone (a classifier's) was measured on: no samples, no Inception."""
        return {
            "generated": 0,
            "generator": generator_label,
            "reference_split": self.cfg.eval.recon_split,
            "reference_images": images,
            "inception": "not used",
            "shards": self.shard_dir,
        }

    def protocol(
        self, references: list[ref_cache.Reference], generator_label: str, generated: int, sizes: list[int]
    ) -> dict:
        """What the row's distances were measured under: `generated` images scored by FID (noise samples,
        or translations when only translation is scored), in sets of `sizes`, against `references`
        (eval.split's, or the translations' target domains', joined by '+')."""
        ev = self.cfg.eval
        described = references[0].description
        return {
            "fid": PROTOCOL,
            "inception": described["inception"],
            "generated": generated,
            "generator": generator_label,
            "noise_seed": ev.seed,
            "reference_split": "+".join(reference.description["split"] for reference in references),
            "reference_images": sum(reference.count for reference in references),
            "reference_key": "+".join(reference.key[:16] for reference in references),
            "shards": self.shard_dir,
            "preprocessing": described["preprocessing"],
            "kid": {
                "subsets": ev.kid_subsets,
                "subset_size": min(ev.kid_subset_size, *(reference.count for reference in references), *sizes),
                "kernel": "(x.y/d + 1)^3",
            },
        }


def append_row(run_dir: str | Path, row: dict) -> None:
    append_jsonl(Path(run_dir) / EVAL_LOG, row)


def read_rows(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / EVAL_LOG)
