"""`plan_run`: everything a run decides before a model loads, in one place for the CLI, the tab and the API.

The checks that cost seconds (options, output name and folders, the state to resume, the image folder) come
before the base model is loaded, so a mistake costs seconds, not a load. Reading the image folder decodes
every picture; a `ScanCache` (the run manager keeps one) lets the tab's Check folder, the manager's check
and the run share that one scan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..data.captions import CaptionOptions
from ..data.dataset import BatchingOptions, TrainingSet
from ..data.scan import DatasetScan, ScanCache, scan_dataset
from ..errors import ConfigError
from ..methods.base import Method
from ..methods.registry import MethodSpec
from .output_checks import check_output_locations
from .folder import require_resumable
from ..training.state import latest_state


@dataclass(frozen=True)
class RunPlan:
    """A validated config and what it resolves to on disk: the result's path, the run folder, the saved state
    a resumed run continues from (None for a fresh run), the scanned images and their batches."""

    config: RunConfig
    target: Path
    run_dir: Path
    saved_state: Path | None
    scan: DatasetScan
    training_set: TrainingSet

    @property
    def spec(self) -> MethodSpec:
        return self.config.spec

    @property
    def method_type(self) -> type[Method]:
        return self.spec.method_class()

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the user should know before the run starts (skipped files, duplicates, empty captions)."""
        return self.scan.warnings

    def with_config(self, config: RunConfig) -> RunPlan:
        """This plan for `config` as the loaded model's family defaults changed it (say, its resolution): the
        same files and scan, the batches re-sized without reading a picture again."""
        return dataclasses.replace(self, config=config, training_set=TrainingSet(self.scan, batching_options(config)))


def plan_run(config: RunConfig, *, resume: Path | None = None, scans: ScanCache | None = None) -> RunPlan:
    """Check `config` without loading a model or writing a file; raises `UserFacingError` naming the fix.
    `resume` is the run folder of a run to continue; `scans` keeps the folder's scan between checks."""
    config.validate()
    target, run_dir = check_output_locations(config, resume=resume)
    config.spec.method_class().check_before_load(config)
    saved_state = _saved_state_to_resume(run_dir) if resume else None
    scan = scan_images(config, scans)
    return RunPlan(config=config, target=target, run_dir=run_dir, saved_state=saved_state, scan=scan,
                   training_set=TrainingSet(scan, batching_options(config)))


def scan_images(config: RunConfig, scans: ScanCache | None = None) -> DatasetScan:
    """The image folder as `config` trains it: images without a caption take the method's default caption."""
    data = config.data
    scan = scans.scan if scans is not None else scan_dataset
    return scan(Path(data.data), caption_extension=data.caption_extension, default_repeats=data.repeats,
                default_caption=config.spec.method_class().default_caption(config))


def batching_options(config: RunConfig) -> BatchingOptions:
    """How the run's pictures become batches, from the config's data and training sections."""
    data = config.data
    low, high = data.bucket_bounds
    return BatchingOptions(
        resolution=data.resolution, buckets=data.buckets, min_bucket_side=low, max_bucket_side=high,
        bucket_step=data.bucket_step, no_upscale=not data.upscale, batch_size=config.training.batch_size,
        flip=data.flip, random_crop=data.random_crop, masked_loss=data.masked_loss, seed=config.training.seed,
        captions=CaptionOptions(shuffle=data.shuffle_captions, keep_tokens=data.keep_tokens,
                                caption_dropout=data.caption_dropout, tag_dropout=data.tag_dropout),
    )


def _saved_state_to_resume(run_dir: Path) -> Path:
    saved = latest_state(run_dir, require_resumable(run_dir))
    if saved is None:
        raise ConfigError(f"{run_dir} holds no saved state of the run its config.toml describes (any state there "
                          "is from an earlier run under the same name).", "Start the run again without --resume.")
    return saved
