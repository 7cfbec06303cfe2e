"""ArtEmoBench evaluation: actor pool == in-process, results.json per spec, skipped media, deaf check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, bench_clip, cli, ok, run

from vaemo.data.bench import read_bench
from vaemo.data.synth import Codec, encode_clip
from vaemo.eval.run import evaluate, evaluate_runs
from vaemo.eval.scoring import Scorer, deaf_sources, plan, question_prompt


def test_deaf_check_gives_every_audio_clip_another_clips_soundtrack(small_world):
    items = read_bench(small_world / "bench")
    sources = deaf_sources(items, seed=3)
    audio_clips = {i.media for i in items if i.modality == "audio"}
    assert set(sources) == audio_clips and set(sources.values()) == audio_clips
    assert all(a != b for a, b in sources.items())
    chunks = plan(items, deaf_check=True, chunk_items=10)
    tasks = [t for c in chunks for t in c]
    assert sum(t.deaf for t in tasks) == sum(i.modality == "audio" for i in items)
    for chunk in chunks:  # a clip's questions stay in one chunk: decoded once
        for media in {t.item.media for t in chunk}:
            assert all(t.item.media != media for other in chunks if other is not chunk for t in other)


def test_the_deaf_check_borrows_only_soundtracks_that_play(small_world, tmp_path, capsys):
    """A missing or silent clip lent its soundtrack would leave another clip's question unscored, blamed on that
    clip (`unreadable_media` on a readable clip, in a user's run); it neither lends nor borrows."""
    shutil.copytree(small_world / "bench", tmp_path / "bench")
    items = read_bench(tmp_path / "bench")
    audio_clips = sorted({i.media for i in items if i.modality == "audio"})
    audio_clips[0].write_bytes(b"not a clip at all")
    audio_clips[1].write_bytes(encode_clip(np.zeros((12, 32, 32, 3), np.uint8), None, 12, 16000, Codec()))
    sources = deaf_sources(items, seed=3)
    assert set(sources) == set(sources.values()) == set(audio_clips[2:]) and all(a != b for a, b in sources.items())
    deaf = [t for chunk in plan(items, deaf_check=True, chunk_items=10) for t in chunk if t.deaf]
    assert deaf and not [t for t in deaf if t.item.media in audio_clips[:2] or t.audio_from in audio_clips[:2]]
    assert "deaf check: 2 clip(s) asked under audio have no soundtrack that opens here" in capsys.readouterr().out


def test_the_deaf_check_knows_the_donor_clips_answer(small_world):
    items = read_bench(small_world / "bench")
    truth = {(i.media, i.modality, i.task): i.options[i.answer] for i in items}
    deaf = [t for chunk in plan(items, deaf_check=True, chunk_items=10) for t in chunk if t.deaf]
    assert deaf and all(t.donor_answer >= 0 for t in deaf)
    for task in deaf:
        assert task.item.options[task.donor_answer] == truth[(task.audio_from, "audio", task.item.task)]


def test_the_report_gives_donor_accuracy_and_the_always_one_option_baseline():
    import dataclasses

    from vaemo.eval.report import chance_report, position_report, summarize
    from vaemo.eval.scoring import ItemResult

    def result(i, deaf=False, predicted=0, donor=-1):
        return ItemResult(
            f"q{i}",
            "audio",
            "content",
            deaf,
            False,
            correct=predicted == i % 4,
            predicted=predicted,
            answer=i % 4,
            options=4,
            donor_answer=donor,
        )

    normal = [result(i, predicted=i % 4 if i < 6 else 0) for i in range(8)]  # answers 0,1,2,3,0,1,2,3
    # A listening model answers for the donor clip: right against the donor, wrong against the item.
    deaf = [result(i, True, predicted=(i + 1) % 4, donor=(i + 1) % 4) for i in range(8)]
    report = summarize(normal + deaf)
    assert report["accuracy"]["audio"]["content"] == 0.75
    assert report["deaf_check"] == {"accuracy": 0.0, "items": 8, "donor_accuracy": 1.0}
    # An item skipped for want of its own soundtrack is not deaf-checked on another clip's either.
    unheard = dataclasses.replace(normal[0], skipped=True, reason="no_audio_stream")
    assert summarize([unheard, *normal[1:], *deaf])["deaf_check"]["items"] == 7
    assert report["always_option"]["audio"]["content"] == {"best": 0.25, "per_option": [0.25] * 4}
    skewed = summarize([result(i) for i in (0, 4, 8, 1)])  # answers 0, 0, 0, 1
    assert skewed["always_option"]["audio"]["content"]["best"] == 0.75
    assert position_report(skewed)["accuracy"]["audio"]["content"] == 0.75
    # Guessing is scored per cell: content asked with 4 options and emotion with 2 are not both 1/3.
    two = [dataclasses.replace(result(i), task="emotion", options=2, answer=i % 2, correct=i % 2 == 0) for i in range(4)]
    mixed = summarize(normal + two)
    assert mixed["chance_by_task"] == {"audio": {"content": 0.25, "emotion": 0.5}}
    assert chance_report(mixed)["accuracy"]["audio"] == {"content": 0.25, "emotion": 0.5, "all": mixed["chance"]["audio"]}


def test_the_benchmark_asks_questions_as_training_does(small_world):
    """Scoring reads a question the way stage 0-2 prompts wrote it: the text, then the options listed."""
    import numpy as np

    from vaemo.config import load_config
    from vaemo.train.objectives import mcq

    questions = load_config(ROOT / "configs/tiny.yaml").prompts.questions
    for item in read_bench(small_world / "bench")[:12]:
        trained = mcq(questions[item.task]["ask"], list(item.options), np.random.default_rng(0), canonical=True)
        asked = question_prompt(item)
        for prompt in (trained, asked):
            question, listed = prompt.split(" Options: ")
            assert question == item.question and sorted(listed.rstrip(".").split(", ")) == sorted(item.options)
        assert asked.split(" Options: ")[1] == ", ".join(item.options) + "."  # in the item's order


@pytest.mark.slow
def test_an_actor_pool_uses_the_actors_that_start_and_asks_for_none_the_cluster_cannot_hold(capsys):
    """Ray's ActorPool hands an item to every actor at once, started or not: with GPUs another job held, an
    eval waited for good on actors that could never start."""
    import ray

    from vaemo.cluster import connect_ray, map_on_actors

    class Doubler:  # defined here, so that Ray sends the class itself to the actors
        def double(self, value: int) -> int:
            return 2 * value

    connect_ray()
    try:
        half = ray.cluster_resources()["CPU"] / 2  # two such actors fit the cluster, whatever its size
        items, doubled = list(range(8)), [2 * i for i in range(8)]
        assert sorted(map_on_actors(Doubler, (), "double", items, actors=5, cpus=half, gpus=0)) == doubled
        assert "2 actor(s) instead of 5" in capsys.readouterr().out
        assert list(map_on_actors(Doubler, (), "double", [], actors=2, cpus=half, gpus=0)) == []
        holder = ray.remote(num_cpus=half)(Doubler).remote()  # another job's actor holds half of the CPUs
        ray.get(holder.__ray_ready__.remote())
        assert sorted(map_on_actors(Doubler, (), "double", items, actors=2, cpus=half, gpus=0)) == doubled
        assert "1 of 2 actor(s) never started" in capsys.readouterr().out
    finally:
        ray.shutdown()  # this test session's own Ray connection (its actors with it): a test that stops the head must not kill it


@pytest.mark.slow
def test_one_actor_pool_scores_several_exports_and_benches_as_one_process_scores_each(
    small_world, adapter_export, stage0_export, tmp_path
):
    import ray

    half = tmp_path / "half"  # a second bench: other items, other deaf-check donors
    shutil.copytree(small_world / "bench", half)
    lines = (half / "items.jsonl").read_text().splitlines()
    (half / "items.jsonl").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    # The exports interleaved: the pool groups each export's chunks, and the results must not depend on it.
    runs = {
        "adapter, bench": (adapter_export, small_world / "bench"),
        "stage 0, half": (stage0_export, half),
        "adapter, half": (adapter_export, half),
    }
    try:
        pooled = evaluate_runs(runs, actors=2, batch_items=12)
    finally:
        ray.shutdown()  # this test session's own Ray: later tests start theirs in subprocesses
    assert list(pooled) == list(runs)
    assert pooled["adapter, half"][0]["counts"] != pooled["adapter, bench"][0]["counts"]
    for name, (model, folder) in runs.items():
        pooled_report, pooled_items = pooled[name]
        single, single_items = evaluate(model, folder, actors=0, batch_items=12)
        assert pooled_report == single, name
        assert len(pooled_items) == len(single_items)
        for a, b in zip(pooled_items, single_items):
            assert (a.id, a.deaf, a.predicted) == (b.id, b.deaf, b.predicted)
            assert a.scores == pytest.approx(b.scores, abs=1e-6)
    assert [r.scores for r in pooled["stage 0, half"][1]] != [r.scores for r in pooled["adapter, half"][1]]


def test_a_chunk_passes_each_clip_through_the_towers_once_and_scores_as_one_question_at_a_time(
    small_world, adapter_export, tmp_path
):
    bench = tmp_path / "bench"
    shutil.copytree(small_world / "bench", bench)
    silent = bench_clip(bench.parent, 2)  # loses its soundtrack: its visual questions still count
    stripped = silent.with_name("stripped" + silent.suffix)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(silent), "-an", "-c", "copy", str(stripped)], check=True)
    stripped.replace(silent)
    scorer = Scorer(adapter_export)
    rows = {"video": 0, "audio": 0}
    for pathway in ("video", "audio"):
        tower = getattr(scorer.model, f"{pathway}_tokens")

        def counted(x, tower=tower, pathway=pathway):
            rows[pathway] += len(x)
            return tower(x)

        setattr(scorer.model, f"{pathway}_tokens", counted)
    chunk = plan(read_bench(bench), deaf_check=True, chunk_items=10**6)[0]
    together = scorer.score(chunk)
    scored = [r for r in together if not r.skipped]
    assert rows["video"] == len({r.media for r in scored if r.modality != "audio"}) == len({t.item.media for t in chunk})
    assert rows["audio"] == len({(r.media, r.deaf) for r in scored if r.modality != "visual"})
    assert {(r.modality, r.reason) for r in together if r.media == str(silent) and r.skipped} == {
        ("audio", "no_audio_stream"),
        ("audio_visual", "no_audio_stream"),
    }
    for task, result in zip(chunk, together):
        if task.item.modality != "audio" and not result.skipped:
            (alone,) = scorer.score([task])
            assert alone.scores == pytest.approx(result.scores, abs=1e-4)


@pytest.mark.slow
def test_results_follow_the_spec_and_an_unreadable_clip_is_counted(small_world, adapter_export, stage0_export, tmp_path):
    """On the actor pool, with every path relative to where the user runs (the actors run elsewhere)."""
    bench = tmp_path / "bench"
    shutil.copytree(small_world / "bench", bench)
    bench_clip(bench.parent, 3).write_bytes(b"not a clip at all")
    out = tmp_path / "eval"
    here = Path(os.path.commonpath([adapter_export, stage0_export, tmp_path]))
    rel = lambda path: os.path.relpath(path, here)  # noqa: E731
    cmd = [sys.executable, str(ROOT / "jobs/eval.py"), "--model", rel(adapter_export), "--bench", rel(bench)]
    cmd += ["--out", rel(out), "--actors", "2", "--baseline", f"before={rel(stage0_export)}"]
    result = ok(subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=here))
    report = json.loads((out / "results.json").read_text())
    assert report["skipped"] == 6 and report["skipped_by_reason"] == {"corrupt_clip": 6}  # the clip is asked 6 questions
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    skipped = [p for p in predictions if p["skipped"]]
    assert skipped and all(p["reason"] == "corrupt_clip" for p in skipped)
    scored = [p for p in predictions if not p["skipped"]]
    for modality in ("audio", "visual", "audio_visual"):
        assert report["counts"][modality] == {"content": 15, "emotion": 15}
        assert set(report["va"][modality]) == {"valence_mae", "arousal_mae", "clips"}
        for task in ("content", "emotion"):  # the report's numbers are the predictions' own
            answered = [p["correct"] for p in scored if p["modality"] == modality and p["task"] == task and not p["deaf"]]
            assert report["accuracy"][modality][task] == pytest.approx(sum(answered) / len(answered))
    # The deaf check covers the audio items that were scored: not the broken clip's, heard on another's sound.
    unheard = {p["id"] for p in skipped if not p["deaf"]}
    deaf = [p["correct"] for p in scored if p["deaf"] and p["id"] not in unheard]
    assert unheard and report["deaf_check"]["items"] == len(deaf) > 0
    assert report["deaf_check"]["accuracy"] == pytest.approx(sum(deaf) / len(deaf))
    # A baseline is scored like the model: the same numbers as evaluating that export on its own.
    alone, _ = evaluate(stage0_export, bench, actors=0)
    assert report["baselines"]["before"]["accuracy"] == alone["accuracy"]  # the pool scores as one process does
    assert report["baselines"]["before"]["accuracy"] != report["accuracy"]
    assert (out / "accuracy.png").is_file()
    assert "deaf" in result.stdout and "model" in result.stdout  # the table


def test_bad_arguments_are_one_line_errors(small_world, tmp_path):
    cmd = [sys.executable, str(ROOT / "jobs/eval.py"), "--bench", str(small_world / "bench"), "--out", str(tmp_path)]
    result = run(cmd + ["--model", str(tmp_path)])
    assert result.returncode == 2 and "is not a vaemo export" in result.stderr
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "items.jsonl").write_text('{"id": "x"}\n')
    result = run(
        [
            sys.executable,
            str(ROOT / "jobs/eval.py"),
            "--model",
            str(tmp_path),
            "--bench",
            str(tmp_path / "bench"),
            "--out",
            str(tmp_path),
        ]
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = run(cmd + ["--model", str(tmp_path), "--baseline", "model=elsewhere"])  # the table's row of the model
    assert result.returncode == 2 and "the name 'model' is taken" in result.stderr
    result = run(cmd + ["--model", str(tmp_path), "--baseline", f"={tmp_path}"])  # a row without a name
    assert result.returncode == 2 and "must look like NAME=EXPORT_DIR (a name and a folder)" in result.stderr
    result = run(cmd + ["--model", str(tmp_path), "--cpus-per-actor", "-1"])
    assert result.returncode == 2 and "--cpus-per-actor (eval.cpus_per_actor) must be > 0" in result.stderr
    result = run(cmd + ["--model", str(tmp_path), "--max-items", "-1"])
    assert result.returncode == 2 and "--max-items (eval.max_items) must be >= 0" in result.stderr


def test_an_output_that_cannot_be_written_stops_the_scoring_before_it_starts(small_world, stage0_export, tmp_path):
    taken = tmp_path / "results"
    taken.write_text("a file where the output folder should go")
    result = run(
        [sys.executable, str(ROOT / "jobs/eval.py"), "--model", str(stage0_export), "--bench", str(small_world / "bench")]
        + ["--out", str(taken), "--actors", "0"]
    )
    assert result.returncode == 2 and f"--out '{taken}' is a file; give a folder" in result.stderr
    assert "scoring" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    answers = cli("ask", "--model", str(stage0_export), "--clips", str(small_world / "bench" / "media"), "--out", str(tmp_path))
    assert answers.returncode == 2 and f"--out '{tmp_path}' is a folder; give a file name" in answers.stderr


def test_a_bench_none_of_whose_items_can_be_scored_is_one_line_not_an_empty_report(stage0_export, tmp_path):
    """A wrong media folder, or a painting asked to be heard: rc 0 and a results.json holding NaN before."""
    bench = tmp_path / "bench"
    (bench / "media").mkdir(parents=True)
    picture = bench / "media" / "painting.png"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=s=96x64:d=1", "-frames:v", "1", str(picture)], check=True
    )
    item = {"task": "emotion", "question": "Which emotion?", "options": ["calm", "joy"], "answer": 0}
    lines = [
        {"id": "a", "media": "media/painting.png", "modality": "audio"},
        {"id": "b", "media": "media/gone.mp4", "modality": "visual"},
    ]
    (bench / "items.jsonl").write_text("".join(json.dumps({**line, **item}) + "\n" for line in lines))
    cmd = [sys.executable, str(ROOT / "jobs/eval.py"), "--model", str(stage0_export), "--bench", str(bench)]
    result = run(cmd + ["--out", str(tmp_path / "eval"), "--actors", "0"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --bench '{bench}': none of its 2 items could be scored: no_audio_stream 1, unreadable_media 1"]
    assert not (tmp_path / "eval" / "results.json").exists()


@pytest.mark.slow
def test_an_export_scored_in_bf16_answers_as_in_fp32(small_world, stage0_export):
    """The GPU's precision, here on the CPU: the same items, the same answers (>= 95%), every modality."""
    fp32, fp32_items = evaluate(stage0_export, small_world / "bench", actors=0, batch_items=24, dtype="fp32")
    bf16, bf16_items = evaluate(stage0_export, small_world / "bench", actors=0, batch_items=24, dtype="bf16")
    assert fp32["skipped"] == bf16["skipped"] == 0
    assert [(a.id, a.deaf) for a in fp32_items] == [(b.id, b.deaf) for b in bf16_items]
    for modality in ("audio", "visual", "audio_visual"):
        scored = [b for b in bf16_items if b.modality == modality and not b.deaf]
        assert scored and all(b.scores and all(s > -1e9 for s in b.scores) for b in scored), modality
    same = sum(a.predicted == b.predicted for a, b in zip(fp32_items, bf16_items)) / len(fp32_items)
    assert same >= 0.95, same


def test_the_eval_section_of_a_preset_gives_the_defaults(tmp_path):
    from vaemo.eval.run import add_eval_args, eval_settings

    parser = __import__("argparse").ArgumentParser()
    add_eval_args(parser)
    base = ["--model", "m", "--bench", "b", "--out", "o"]
    preset, autoscaling = eval_settings(parser.parse_args([*base, "--config", str(ROOT / "configs/qwen2.5-vl-7b.yaml")]))
    assert (preset.actors, preset.batch_items, preset.deaf_check, preset.gpus_per_actor) == (8, 32, True, None)
    assert not autoscaling
    flags, _ = eval_settings(
        parser.parse_args(
            [*base, "--config", str(ROOT / "configs/qwen2.5-vl-7b.yaml"), "--actors", "3", "--dtype", "bf16", "--no-deaf-check"]
        )
    )
    assert (flags.actors, flags.batch_items, flags.dtype, flags.deaf_check) == (3, 32, "bf16", False)
    assert eval_settings(parser.parse_args(base))[0].actors == 2
    # A cluster whose GPU nodes start on demand: the preset says so, the flag asks for a GPU per actor.
    on_demand = tmp_path / "on-demand.yaml"
    on_demand.write_text(f"base: {ROOT / 'configs/qwen2.5-vl-7b.yaml'}\nscaling:\n  autoscaling: true\n")
    settings, autoscaling = eval_settings(parser.parse_args([*base, "--config", str(on_demand)]))
    assert (settings.gpus_per_actor, autoscaling) == (1.0, True)  # its GPU nodes are not up to be counted
    settings, _ = eval_settings(parser.parse_args([*base, "--config", str(on_demand), "--gpus-per-actor", "0"]))
    assert settings.gpus_per_actor == 0.0
    from_preset = parser.parse_args(["--model", "m", "--out", "o", "--config", str(ROOT / "configs/tiny.yaml")])
    eval_settings(from_preset)
    assert from_preset.bench == str(ROOT / "runs/data/bench")  # the preset's data.bench_dir, made absolute
    from vaemo.errors import UserError

    with pytest.raises(UserError, match="--bench is required"):
        eval_settings(parser.parse_args(["--model", "m", "--out", "o"]))
    with pytest.raises(UserError, match=r"--gpus-per-actor \(eval.gpus_per_actor\) must be >= 0"):
        eval_settings(parser.parse_args([*base, "--gpus-per-actor", "-1"]))


def test_chart_labels_draw_in_a_font_that_has_them_and_characters_none_has_are_one_line(tmp_path, capsys):
    import warnings

    from matplotlib import font_manager

    from vaemo.eval.report import chart, summarize
    from vaemo.eval.scoring import ItemResult
    from vaemo.plotting import BASE_FONT, _characters, fonts_for

    def report(task):
        return summarize([ItemResult(f"q{i}", "audio", task, False, False, i % 2 == 0, 0, i % 2, 2) for i in range(4)])

    # U+2312 is not in DejaVu Sans, matplotlib's default, but is in DejaVu Sans Mono, which ships with it.
    families = fonts_for(["arc \u2312"])["font.family"]
    assert families[0] == BASE_FONT and "\u2312" not in _characters(font_manager.findfont(BASE_FONT))
    assert any("\u2312" in _characters(font_manager.findfont(family)) for family in families[1:]), families
    chart({"model \u2312": report("arc \u2312")}, tmp_path / "arc.png")
    assert (tmp_path / "arc.png").is_file()
    assert "no installed font" not in capsys.readouterr().out
    # U+FDD0 is a noncharacter: no font has it. The chart is still written, with one line naming it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chart({"model": report("x\ufdd0")}, tmp_path / "none.png")
    assert not [w for w in caught if "missing from" in str(w.message)]
    assert (tmp_path / "none.png").is_file()
    lines = [line for line in capsys.readouterr().out.splitlines() if "no installed font" in line]
    assert len(lines) == 1 and "1 character(s)" in lines[0] and "\ufdd0" in lines[0]
