"""`vaemo ask`: one clip, a folder on the actor pool, fp32 and bf16, and one-line errors."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import bench_clip, cli

pytestmark = pytest.mark.slow


def last_json(result) -> dict:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


# bf16 asks once, with both towers (each answer is a process that loads the model: about 8 s here).
@pytest.mark.parametrize("dtype,modalities", [("fp32", ("audio", "visual", "audio_visual")), ("bf16", ("audio_visual",))])
def test_ask_answers_about_one_clip_with_valence_and_arousal(small_world, adapter_export, dtype, modalities):
    clip = bench_clip(small_world, 0)
    for modality in modalities:
        answer = last_json(
            cli(
                "ask",
                "--model",
                str(adapter_export),
                "--clip",
                str(clip),
                "--modality",
                modality,
                "--question",
                "What emotion does this artwork express?",
                "--dtype",
                dtype,
                "--max-new-tokens",
                "4",
                "--json",
            )
        )
        assert answer["clip"] == str(clip) and answer["modality"] == modality and not answer["error"]
        assert isinstance(answer["answer"], str)
        assert -1.0 <= answer["valence"] <= 1.0 and -1.0 <= answer["arousal"] <= 1.0  # the Supervisor's tanh


def test_ask_answers_a_folder_on_the_actor_pool_and_counts_bad_clips(small_world, adapter_export, tmp_path):
    import shutil

    folder = tmp_path / "clips"
    (folder / "nested").mkdir(parents=True)
    for i in range(3):
        shutil.copy(bench_clip(small_world, i), folder / "nested" / f"c{i}.mp4")
    (folder / "broken.mp4").write_bytes(b"not a clip")
    (folder / "notes.txt").write_text("ignored")
    run = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi"]
    subprocess.run([*run, "-i", "sine=f=440:d=2", str(folder / "song.wav")], check=True)  # music alone: heard
    subprocess.run([*run, "-i", "testsrc=s=96x64:d=1", "-frames:v", "1", str(folder / "still.png")], check=True)
    out = tmp_path / "answers.jsonl"
    result = cli(
        "ask",
        "--model",
        str(adapter_export),
        "--clips",
        str(folder),
        "--out",
        str(out),
        "--actors",
        "2",
        "--dtype",
        "bf16",
        "--max-new-tokens",
        "3",
        "--modality",
        "audio",
        "--json",
    )
    summary = last_json(result)
    assert summary == {"out": str(out), "clips": 6, "answered": 4, "failed_by_reason": {"corrupt_clip": 1, "no_audio_stream": 1}}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["clip"].split("/")[-1] for r in rows] == ["broken.mp4", "c0.mp4", "c1.mp4", "c2.mp4", "song.wav", "still.png"]
    assert rows[0]["error"] == "corrupt_clip" and rows[0]["answer"] is None
    assert rows[-1]["error"] == "no_audio_stream" and rows[-1]["answer"] is None  # a painting has nothing to hear
    assert all(not r["error"] and isinstance(r["answer"], str) and r["valence"] is not None for r in rows[1:-1])
    # the same clip alone, in-process, gets the same greedy answer
    alone = last_json(
        cli(
            "ask",
            "--model",
            str(adapter_export),
            "--clip",
            rows[1]["clip"],
            "--dtype",
            "bf16",
            "--max-new-tokens",
            "3",
            "--modality",
            "audio",
            "--json",
        )
    )
    assert alone["answer"] == rows[1]["answer"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--clip", "/nowhere/clip.mp4"], "--clip '/nowhere/clip.mp4' is not a file"),
        (["--clips", "/nowhere/", "--out", "/tmp/x.jsonl"], "--clips '/nowhere/' matches no clip file"),
        (["--clip", "BAD", "--modality", "smell"], "argument --modality: invalid choice: 'smell'"),
        (["--clip", "BAD"], "cannot be used: FFmpeg cannot open the clip (corrupt_clip)"),
        (["--clip", "PICTURE"], "the clip has no audio stream (no_audio_stream); ask with --modality visual"),
        (["--clips", "BENCH"], "--clips needs --out"),
        (["--clips", "TMP", "--out", "OUT"], "none of its 2 clip(s) could be used"),  # a broken clip and a painting
        (["--clip", "BAD", "--question", "LONG"], "positions this model reads (max_position_embeddings)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(adapter_export, small_world, tmp_path, args, message):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"junk")
    picture = tmp_path / "painting.png"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=s=96x64:d=1", "-frames:v", "1", str(picture)], check=True
    )
    names = {
        "BAD": str(bad),
        "BENCH": str(small_world / "bench" / "media"),
        "PICTURE": str(picture),
        "TMP": str(tmp_path),
        "OUT": str(tmp_path.parent / f"{tmp_path.name}.jsonl"),
        "LONG": "why " * 5000,
    }
    args = [names.get(a, a) for a in args]
    result = cli("ask", "--model", str(adapter_export), *args)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_folder_that_is_no_export_is_refused(small_world, tmp_path):
    result = cli("ask", "--model", str(tmp_path), "--clip", str(bench_clip(small_world, 0)))
    assert result.returncode == 2 and "is not a vaemo export" in result.stderr


def test_the_readmes_python_example_runs(small_world, adapter_export, capsys):
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Asking a trained model") :]
    code = section[section.index("```python") + len("```python") :]
    code = code[: code.index("```")]
    code = code.replace("runs/demo/stage2/export", str(adapter_export))
    code = code.replace('"clip.mp4"', repr(str(bench_clip(small_world, 2))))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) >= 2 and printed[-1].startswith("tensor([[")  # the answer, then valence/arousal


def test_ask_finds_clips_in_linked_folders_once(tmp_path):
    """--clips FOLDER searched linked folders as pack does (rglob skipped them without a word)."""
    import os

    from vaemo.eval.ask import find_clips

    (tmp_path / "real").mkdir()
    (tmp_path / "src" / "nested").mkdir(parents=True)
    for path in (tmp_path / "real" / "a.mov", tmp_path / "src" / "nested" / "b.MP4", tmp_path / "src" / "notes.txt"):
        path.write_bytes(b"clip bytes are not read here")
    os.symlink(tmp_path / "real", tmp_path / "src" / "linked")
    os.symlink(tmp_path / "src", tmp_path / "real" / "back-up")  # a cycle ends
    found = find_clips(str(tmp_path / "src"))
    assert found == sorted([(tmp_path / "real" / "a.mov").resolve(), (tmp_path / "src" / "nested" / "b.MP4").resolve()])
    os.symlink(tmp_path / "real" / "a.mov", tmp_path / "real" / "same.mov")
    assert find_clips(str(tmp_path / "real" / "*.mov")) == [(tmp_path / "real" / "a.mov").resolve()]  # a link and its target
