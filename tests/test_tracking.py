"""Every run writes TensorBoard (read back with TensorBoard's own reader): the logged scalars, the
grids, the evaluations and the hparams with the final metrics; a resumed run continues the curves
without a step twice; a tracker that is unknown or not installed is refused."""

import shutil

import pytest
from conftest import RANDOM_EVAL, stop_requested_at
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from gendist.config import ConfigError, load_config
from gendist.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def read_events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_a_run_writes_scalars_grids_evaluations_and_hparams(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, *RANDOM_EVAL, "train.steps=4", "train.sample_every=2", "eval.every=4"]
    run = train(load_config(None, [*overrides, f"eval.stats_dir={tmp_path / 'stats'}"])).run_dir
    events = read_events(run)
    tags = events.Tags()
    assert {"loss_d", "loss_g", "d_real", "images_per_s", "data_errors", "eval/fid", "eval/kid"} <= set(tags["scalars"])
    assert [event.step for event in events.Scalars("loss_g")] == [2, 4]  # train.log_every=2
    assert [event.step for event in events.Images("samples/grid")] == [2, 4]
    assert events.Images("samples/grid")[0].width > 0
    assert {"final/loss_g", "final/eval/fid"} <= set(tags["scalars"])
    (start,) = [
        plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info
        for path in sorted((run / "tensorboard").glob("events.out.tfevents.*"))
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.tag == "_hparams_/session_start_info"
    ]
    assert start.hparams["model.name"].string_value == "dcgan" and start.hparams["train.steps"].number_value == 4


def test_a_resumed_run_continues_the_curves_without_a_step_twice(tiny_overrides, tmp_path):
    """Killed after logging step 3 with its last checkpoint at step 2 (the stop's own checkpoint
    removed): the resumed run logs 3 again, and TensorBoard keeps only the new one."""
    overrides = [*tiny_overrides, "train.steps=6", "train.log_every=1", "train.checkpoint_every=2"]
    with stop_requested_at(3):
        run = train(load_config(None, overrides)).run_dir
    shutil.rmtree(run / "checkpoints" / "step_0000003")
    first = {event.step: event.value for event in read_events(run).Scalars("loss_g")}
    train(load_config(None, overrides))
    curve = read_events(run).Scalars("loss_g")
    assert [event.step for event in curve] == [1, 2, 3, 4, 5, 6]
    assert [event.value for event in curve[:2]] == [first[1], first[2]]


def test_trackers_off_unknown_and_missing(tiny_overrides, tmp_path):
    run = train(load_config(None, [*tiny_overrides, "train.steps=1", "train.trackers=[]"])).run_dir
    assert not (run / "tensorboard").exists()
    with pytest.raises(ConfigError, match="Accelerate's trackers are"):
        train(load_config(None, [*tiny_overrides, "train.trackers=[tensorbored]"]))
    with pytest.raises(ConfigError, match="not installed here"):
        train(load_config(None, [*tiny_overrides, "train.trackers=[swanlab]"]))
