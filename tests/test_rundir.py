"""The run directory: no kill, re-save, prune or shared folder loses a good checkpoint or someone's files."""

import os
from pathlib import Path

import pytest

from mae_vit.config import PretrainConfig, parse_config
from mae_vit.errors import ConfigError
from mae_vit.train import rundir
from mae_vit.train.rundir import COMPLETE, RunDir, TrainState, read_state, save_checkpoint


class FakeAccelerator:
    """What save_checkpoint asks of Accelerate: one process that writes a weights file."""

    is_main_process, num_processes = True, 1

    def wait_for_everyone(self):
        pass

    def save_state(self, folder, safe_serialization=True):
        (Path(folder) / "model.safetensors").write_bytes(b"w" * 100)
        (Path(folder) / "optimizer.bin").write_bytes(b"o" * 50)


def save(run, step, keep_last=3):
    return save_checkpoint(FakeAccelerator(), run, TrainState(step=step, samples_seen=16 * step), keep_last)


def cfg(out, *extra):
    return parse_config(PretrainConfig, ["--output-dir", str(out), *extra])


class Killed(Exception):
    pass


def kill_at_rename_into(monkeypatch, target_name):
    """Simulate a kill at the moment a folder would be renamed to `target_name`."""
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == target_name:
            raise Killed(dst)
        real(src, dst)

    monkeypatch.setattr(rundir.os, "replace", replace)


def test_a_kill_while_re_saving_a_step_on_disk_keeps_that_step(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    save(run, 8, keep_last=1)
    kill_at_rename_into(monkeypatch, "step_0000008")  # the old copy is moved aside, the new one not yet in place
    with pytest.raises(Killed):
        save(run, 8, keep_last=1)
    monkeypatch.undo()
    assert run.latest() is None  # at this moment only .old-step_8 and .tmp-step_8 exist
    assert run.prepare(cfg(tmp_path), is_main=True) == tmp_path / "checkpoints" / "step_0000008"
    assert read_state(run.latest()).step == 8
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_0000008"]


def test_a_kill_before_the_first_rename_promotes_the_finished_copy(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    save(run, 4)
    kill_at_rename_into(monkeypatch, "step_0000008")
    with pytest.raises(Killed):
        save(run, 8)
    monkeypatch.undo()
    assert run.prepare(cfg(tmp_path), is_main=True).name == "step_0000008"  # finished, so not thrown away


def test_a_half_deleted_checkpoint_is_not_resumed_and_the_previous_one_is(tmp_path, caplog):
    run = RunDir(tmp_path)
    for step in (4, 8, 12):
        save(run, step)
    (run.checkpoints / "step_0000012" / "model.safetensors").unlink()
    (run.checkpoints / "step_0000008" / "optimizer.bin").write_bytes(b"o" * 10)  # truncated
    assert run.prepare(cfg(tmp_path), is_main=True).name == "step_0000004"
    assert "step_0000012 is damaged" in caplog.text
    assert (run.checkpoints / "step_0000012").exists()  # ignored, not deleted: somebody may want to look


def test_a_prune_cut_short_leaves_no_complete_looking_folder_and_a_start_removes_it(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    save(run, 4, keep_last=1)
    monkeypatch.setattr(rundir.shutil, "rmtree", lambda p, ignore_errors=False: None)  # killed inside the prune
    save(run, 8, keep_last=1)
    monkeypatch.undo()
    assert not (run.checkpoints / "step_0000004" / COMPLETE).exists()  # the marker went first
    assert [p.name for p in run.complete_checkpoints()] == ["step_0000008"]
    run.prepare(cfg(tmp_path), is_main=True)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_0000008"]


def test_a_folder_with_results_but_no_checkpoint_is_not_started_over(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"someone's model")
    (tmp_path / "metrics.json").write_text("{}")
    run = RunDir(tmp_path, outputs=("metrics.json",))
    with pytest.raises(ConfigError, match="already holds results .*no checkpoint to resume"):
        run.prepare(cfg(tmp_path), is_main=True)  # resume=true, nothing to resume: it would have started over
    assert (tmp_path / "model.safetensors").read_bytes() == b"someone's model"


def test_overwrite_deletes_only_what_this_run_recorded_never_by_name_nor_through_symlinks(tmp_path):
    elsewhere = tmp_path / "someone_else"
    (elsewhere / "logs").mkdir(parents=True)
    (elsewhere / "logs" / "events.out.tfevents.9.host").write_text("their events")
    out = tmp_path / "run"
    out.mkdir()
    (out / "logs").symlink_to(elsewhere)  # a shared logs folder
    run = RunDir(out, outputs=("metrics.json",))
    assert run.prepare(cfg(out), is_main=True) is None  # a fresh start: the run's own names are recorded
    save(run, 4)
    ours = ["model.safetensors", "metrics.json", "config.yaml"]
    mine = {"checkpoints/step_mine/notes.txt": "mine", "reconstructions/step_notes.png": "a picture",
            "notes.md": "keep", "logs/logs/events.out.tfevents.1.host": "their run's events, through the link"}
    for name, text in [*mine.items(), *((n, "x") for n in ours)]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    run.files.update(add=[out / "logs" / "logs" / "events.out.tfevents.1.host"])  # recorded, behind a symlink
    assert run.prepare(cfg(out, "train.resume=false", "train.overwrite=true"), is_main=True) is None
    assert {name: (out / name).read_text() for name in mine} == mine
    assert (elsewhere / "logs" / "events.out.tfevents.9.host").read_text() == "their events"
    assert [name for name in ours if (out / name).exists()] == []
    assert run.latest() is None and not (run.checkpoints / "step_0000004").exists()


def test_overwrite_of_results_this_run_did_not_record_is_refused_and_deletes_nothing(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"someone's model")
    run = RunDir(tmp_path)
    with pytest.raises(ConfigError, match="did not write"):
        run.prepare(cfg(tmp_path, "train.resume=false", "train.overwrite=true"), is_main=True)
    assert (tmp_path / "model.safetensors").read_bytes() == b"someone's model"


def test_an_empty_output_dir_is_refused_rather_than_writing_into_the_current_folder():
    with pytest.raises(ConfigError, match="train.output_dir is empty"):
        RunDir("")


def test_written_files_follow_the_umask_so_a_teammate_can_read_a_shared_run(tmp_path):
    import torch

    from mae_vit.checkpoint import export_safetensors
    from mae_vit.config import save_config
    from mae_vit.files import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        save_config(cfg(tmp_path), tmp_path / "config.yaml")
        export_safetensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
        save(RunDir(tmp_path / "run"), 2)
    finally:
        os.umask(old)
    written = [tmp_path / "m.json", tmp_path / "config.yaml", tmp_path / "model.safetensors",
               tmp_path / "run" / "checkpoints" / "step_0000002" / COMPLETE]
    assert [oct(p.stat().st_mode & 0o777) for p in written] == [oct(0o644)] * 4  # mkstemp made them 0600


def save_at(run, step, samples, keep_last=2):
    return save_checkpoint(FakeAccelerator(), run, TrainState(step=step, samples_seen=samples), keep_last)


def test_a_resume_with_a_bigger_batch_keeps_the_new_checkpoints(tmp_path):
    from mae_vit.checkpoint import weights_in_run_dir

    run = RunDir(tmp_path)
    for step in (4, 8, 12):  # batch 16: 192 samples after step 12
        save_at(run, step, 16 * step)
    save_at(run, 4, 256)  # resumed with batch 64: step 3 was sample 192, step 4 is sample 256
    assert [p.name for p in run.complete_checkpoints()] == ["step_0000012", "step_0000004"]
    assert read_state(run.latest()).samples_seen == 256
    save_at(run, 6, 384)
    assert [read_state(p).samples_seen for p in run.complete_checkpoints()] == [256, 384]
    assert weights_in_run_dir(tmp_path) == run.checkpoints / "step_0000006" / "model.safetensors"


def test_a_newer_checkpoint_at_a_step_the_old_run_used_replaces_it_and_stays_newest(tmp_path):
    run = RunDir(tmp_path)
    for step in (4, 8):  # batch 16
        save_at(run, step, 16 * step)
    save_at(run, 3, 192)  # batch 64 (a resume after step 12, sample 192, with only 8 kept): step_3
    save_at(run, 8, 512)  # batch 64: step 8 again, now after 512 samples
    assert [(p.name, read_state(p).samples_seen) for p in run.complete_checkpoints()] == [
        ("step_0000003", 192), ("step_0000008", 512)]


def test_a_run_directory_given_as_checkpoint_falls_back_to_the_newest_whole_checkpoint(tmp_path):
    from mae_vit.checkpoint import weights_in_run_dir

    run = RunDir(tmp_path)
    for step in (4, 8):
        save(run, step)
    (run.checkpoints / "step_0000008" / "model.safetensors").write_bytes(b"w" * 10)  # truncated
    assert weights_in_run_dir(tmp_path) == run.checkpoints / "step_0000004" / "model.safetensors"


def test_a_resume_with_another_time_budget_says_the_fixed_schedule_is_kept(tmp_path, caplog):
    caplog.set_level("INFO", logger="mae_vit")
    run = RunDir(tmp_path)
    run.save_config(cfg(tmp_path, "optim.time_budget=1h"))
    state = TrainState(step=40, samples_seen=640, budget={"seconds": 3600, "step_s": 0.5, "steps": 7000})
    save_checkpoint(FakeAccelerator(), run, state, 2)
    run.check_resumable(cfg(tmp_path, "optim.time_budget=2h"))
    assert "optim.time_budget 1h -> 2h" in caplog.text
    assert "the schedule fixed by the first start is kept" in caplog.text
    assert "7000 steps in all" in caplog.text
