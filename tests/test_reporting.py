"""A run's records on disk: metrics.jsonl and the start log, across a restart or resume."""

from __future__ import annotations

import json

from vaemo.train.reporting import Accumulator, MetricsWriter, format_line, keep_records_up_to


def steps_of(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def tensorboard_events(folder) -> list:
    """The events of every event file in `folder`, file by file in the order written (TFRecord framing)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_a_start_from_a_checkpoint_drops_what_an_earlier_start_recorded_after_it(tmp_path):
    """Ray restarts a worker group from its last checkpoint (step 3), so steps 4-6 train again: they must be
    recorded once, or every plot of the run doubles back."""
    (tmp_path / "workers").mkdir()
    first = MetricsWriter(tmp_path, start={"launch_id": "a", "checkpoint": None})
    for step in range(1, 7):
        first.write({"step": step, "loss": 1.0 / step})
    first.close()
    again = MetricsWriter(tmp_path, start_step=3, start={"launch_id": "a", "checkpoint": "step-00000003"})
    for step in range(4, 9):
        again.write({"step": step, "loss": 2.0 / step})
    again.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[2]["loss"] == 1.0 / 3 and records[3]["loss"] == 2.0 / 4  # the first start's up to 3, then the second's
    starts = [json.loads(line) for line in (tmp_path / "workers" / "starts.jsonl").read_text().splitlines()]
    assert [(s["step"], s["checkpoint"]) for s in starts] == [(0, None), (3, "step-00000003")]
    assert not list(tmp_path.glob("*.partial"))

    # TensorBoard hides the first start's events from step 4 on: the second start's events begin with that mark
    marks = [(e.step, e.session_log.status) for e in tensorboard_events(tmp_path / "tb") if e.HasField("session_log")]
    assert marks == [(1, 1), (4, 1)]  # SessionLog.START at purge_step: start step + 1

    # a line cut short by a process stopped while appending it goes with what came after the checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    keep_records_up_to(tmp_path / "metrics.jsonl", 8)
    assert steps_of(tmp_path / "metrics.jsonl") == list(range(1, 9))

    # a restart before any checkpoint trains from step 1 again: nothing of the earlier start stays
    keep_records_up_to(tmp_path / "metrics.jsonl", 0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    keep_records_up_to(tmp_path / "absent.jsonl", 5)  # a first start has no file yet
    assert not (tmp_path / "absent.jsonl").exists()


def test_the_progress_line_shows_every_scored_task_not_only_the_synthetic_worlds_two():
    record = {
        "step": 10,
        "loss": 1.5,
        "val_emotion_acc": 0.5,
        "val_style_acc": 0.75,  # a user's own labelled question set (prompts.questions with an answer_field)
        "val_style_audio_acc": 0.25,
        "val_emotion_audio_visual_acc": 0.125,
    }
    line = format_line(record, 100, stage=2)
    assert "val-emo 0.50 val-style 0.75 |" in line and "0.25" not in line and "0.12" not in line


def test_a_checkpoint_keeps_the_unreported_sums_but_the_counts_rates_divide_by_wall_time():
    """A resume's first record averages the loss over every step since the last report, as an uninterrupted
    run's does; its clips/s counts only what the resumed run did in the time it ran."""
    sums = Accumulator()
    sums.add({"loss": 2.0, "steps": 1, "clips": 8, "tokens": 900, "compute_s": 0.5})
    assert sums.unreported() == {"loss": 2.0, "steps": 1.0, "compute_s": 0.5}


def test_lines_keep_their_brackets_on_a_terminal_and_off_it(capsys, monkeypatch):
    """File names and hints hold brackets that rich would take for markup tags and drop (and colons it would take
    for emoji codes)."""
    from vaemo import progress

    line = "ignored 1 file, e.g. [draft] clip:fire:take2.mp4 (declare another scale with a `va_scale: [low, high]` field)"
    progress.log(line)
    assert capsys.readouterr().out.rstrip().endswith(line)
    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    with progress.console.capture() as captured:
        progress.log(line, style="red")
        progress.console.print(f"  bad_field: {line}")
    assert captured.get().count(line) == 2, captured.get()
