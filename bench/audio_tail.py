"""Does a model hear loudness in the sound, or in what fills the window after it? Audio accuracy on a bench as
decoded, and with every soundtrack cut to --sound seconds and then filled as the model was trained
(data.audio_fill: repeated, or silence).

Whisper's log-mel floors every frame at the clip's peak minus 80 dB, so the silent tail of a clip shorter
than the window carries the clip's peak loudness, which the synthetic world ties to arousal. A model trained
on silent tails (audio_fill=silence) and on clips shorter than the window only can learn to read it there; on
clips that fill the window it then loses arousal, and scores higher with the tail cut in (on a bench of 4-8 s
clips). A model that hears loudness in the sound scores about the same both ways. Scores in this process,
audio items only.

    .venv/bin/python bench/audio_tail.py --model runs/demo/stage2/export --bench runs/science/seed0/data/shifted/bench
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vaemo.data.decode as decode  # noqa: E402
from vaemo.data.bench import read_bench  # noqa: E402
from vaemo.errors import exit_on_user_error  # noqa: E402
from vaemo.eval.run import check_model_dir, evaluate  # noqa: E402
from vaemo.model.vaemo_llm import ModelSpec  # noqa: E402


def audio_only_bench(bench: Path, into: Path) -> Path:
    """A copy of the bench's items file with its audio items only, next to a link to the same media."""
    items = [line for line in (bench / "items.jsonl").read_text().splitlines() if json.loads(line)["modality"] == "audio"]
    (into / "items.jsonl").write_text("\n".join(items) + "\n")
    (into / "media").symlink_to((bench / "media").resolve())
    return into


def cut_soundtracks(seconds: float) -> None:
    """From now on, decoded soundtracks keep their first `seconds`, and the window is filled after them as
    the decode spec says (the model's data.audio_fill)."""
    decode_audio = decode.decode_audio

    def cut(raw, spec, start=None, key=""):
        audio, valid, decoded, soundtrack = decode_audio(raw, spec, start, key)
        if audio is None:
            return audio, valid, decoded, soundtrack
        keep = min(valid, int(seconds * decode.SAMPLE_RATE))
        return decode.fill_window(audio[:keep], spec.audio_samples, spec.audio_fill), keep, decoded, soundtrack

    decode.decode_audio = cut  # decode_sample looks it up in its module at each call


def row(name: str, report: dict) -> str:
    accuracy, va = report["accuracy"]["audio"], report.get("va", {}).get("audio", {})
    return (
        f"{name:<32} content {accuracy['content']:.3f}  emotion {accuracy['emotion']:.3f}  "
        f"arousal error {va.get('arousal_mae', float('nan')):.3f}"
    )


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a vaemo export")
    parser.add_argument("--bench", required=True, help="an ArtEmoBench folder (items.jsonl, media/)")
    parser.add_argument("--sound", type=float, default=2.5, help="seconds of each soundtrack kept before the fill")
    args = parser.parse_args()
    check_model_dir(args.model)  # a wrong path is one line (exit 2), before anything is scored
    read_bench(args.bench)
    with tempfile.TemporaryDirectory(prefix="vaemo-tail-") as tmp:
        bench = audio_only_bench(Path(args.bench), Path(tmp))
        as_decoded, _ = evaluate(args.model, bench, actors=0, deaf_check=False, label="as decoded")
        cut_soundtracks(args.sound)
        fill = ModelSpec.read(args.model).audio_fill
        with_tail, _ = evaluate(args.model, bench, actors=0, deaf_check=False, label=f"{args.sound:g} s + {fill}")
    print(row("soundtracks as decoded", as_decoded))
    print(row(f"first {args.sound:g} s, then {fill}", with_tail))
    gain = with_tail["accuracy"]["audio"]["emotion"] - as_decoded["accuracy"]["audio"]["emotion"]
    print(f"audio emotion gained from a cut and filled soundtrack ({fill}): {gain:+.3f}")


if __name__ == "__main__":
    main()
