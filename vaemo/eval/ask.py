"""`vaemo ask`: a trained model's generated answer about one clip, or about many on the evaluation actor pool.

    vaemo ask --model runs/demo/stage2/export --clip clip.mp4 --modality audio
    vaemo ask --model EXPORT --clips 'my_clips/*.mp4' --out answers.jsonl --dtype bf16

Each answer is greedy decoding (`VAEmotionLLM.generate`); with an Emotion Supervisor in the export it
also carries the predicted valence and arousal in [-1, 1].
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vaemo import progress
from vaemo.args import output_file
from vaemo.config import MODALITIES
from vaemo.data.decode import CLIP_EXTENSIONS, PICTURE_EXTENSIONS, SKIP_REASONS, SOUND_EXTENSIONS, SkipSample
from vaemo.errors import UserError
from vaemo.eval.run import check_model_dir
from vaemo.eval.scoring import decode_clip, decode_spec, load_replica, model_row
from vaemo.model.prompts import PromptItem

DEFAULT_QUESTION = "Describe this artwork."
MEDIA_EXTENSIONS = (*CLIP_EXTENSIONS, *PICTURE_EXTENSIONS, *SOUND_EXTENSIONS)
CLIPS_PER_TASK = 8  # clips one actor answers per call: enough to batch, few enough to spread the work


@dataclass
class Answer:
    clip: str
    modality: str
    question: str
    answer: str | None = None
    valence: float | None = None  # only with an Emotion Supervisor
    arousal: float | None = None
    error: str = ""  # a skip reason when the clip could not be used


class Asker:
    """One replica answering questions about clips (also the body of each Ray actor)."""

    def __init__(self, model_dir: str | Path, dtype: str = "auto", threads: int = 0, max_new_tokens: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.model = load_replica(model_dir, dtype=dtype)
        self.spec = decode_spec(self.model)
        self.max_new_tokens = max_new_tokens or self.model.spec.max_response_tokens

    @torch.no_grad()
    def answer(self, jobs: list[tuple[str, str, str]]) -> list[Answer]:
        """jobs: (clip path, modality, question). A clip that cannot be used gets its reason, not an answer."""
        answers, items, videos, audios, durations = [], [], [], [], []
        for clip, modality, question in jobs:
            result = Answer(clip, modality, question)
            answers.append(result)
            try:
                frames, sound, duration = decode_clip(Path(clip), self.spec, modality != "audio", modality != "visual")
            except SkipSample as err:
                result.error = err.reason
                continue
            video, audio = model_row(self.spec, frames, sound)
            videos.append(video)
            audios.append(audio)
            durations.append(duration)
            items.append(PromptItem(modality, question, None, len(videos) - 1))
        if not items:
            return answers
        video, audio = torch.stack(videos), torch.stack(audios)
        texts = self.model.generate(items, video, audio, durations, self.max_new_tokens)
        va = self.model.emotion(items, video, audio, durations)
        usable = [a for a in answers if not a.error]
        for k, (result, text) in enumerate(zip(usable, texts)):
            result.answer = text.strip()
            if va is not None:
                result.valence, result.arousal = round(float(va[k, 0]), 4), round(float(va[k, 1]), 4)
        return answers


def find_clips(pattern: str) -> list[Path]:
    """A folder (searched at any depth for clip files, linked folders included) or a glob; absolute paths, sorted."""
    from vaemo.data.shards import files_under

    path = Path(pattern).expanduser()
    if path.is_dir():
        found = [p for p in files_under(path) if p.suffix.lstrip(".").lower() in MEDIA_EXTENSIONS and p.is_file()]
    else:
        found = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    if not found:
        raise UserError(f"--clips '{pattern}' matches no clip file ({', '.join(MEDIA_EXTENSIONS)})")
    return sorted({p.resolve() for p in found})  # a glob matching a link and its target: the clip once


def check_question_fits(model_dir: Path, question: str, modality: str, max_new_tokens: int) -> None:
    """Refuse, before any model loads, a question whose prompt (the chat turns and the clip's tokens) and
    answer would not fit the positions the language model was built for (a 9,000-token question took 6.5 GB
    on the tiny preset). Video tokens count one position each: M-RoPE gives them fewer, so this errs on the
    safe side."""
    from transformers import AutoConfig

    from vaemo.model.tokenizer import load_tokenizer
    from vaemo.model.vaemo_llm import ModelSpec, prompt_builder

    spec = ModelSpec.read(model_dir)
    prompts = prompt_builder(load_tokenizer(model_dir / "tokenizer"), spec)
    prompt = len(prompts.sequence(PromptItem(modality, question, None, 0))[0])
    answer = max_new_tokens or spec.max_response_tokens
    positions = AutoConfig.from_pretrained(model_dir / "vlm").get_text_config().max_position_embeddings
    if prompt + answer > positions:
        asked = len(prompts.text(question))
        raise UserError(
            f"--question is {asked} tokens: with the chat turns and the clip's tokens the prompt is {prompt}, and "
            f"with an answer of up to {answer} that is more than the {positions} positions this model reads "
            "(max_position_embeddings); ask a shorter question"
        )


def ask_many(
    model_dir: Path,
    clips: list[Path],
    modality: str,
    question: str,
    dtype: str,
    actors: int,
    max_new_tokens: int = 0,
    cpus_per_actor: float = 1.0,
) -> list[Answer]:
    """Answer every clip, on `actors` Ray actors (0: in this process); answers in the clips' order."""
    tasks = [[(str(c), modality, question) for c in clips[i : i + CLIPS_PER_TASK]] for i in range(0, len(clips), CLIPS_PER_TASK)]
    answers: list[Answer] = []
    with progress.task(f"answering {len(clips)} clip(s)", len(tasks)) as update:
        if actors == 0:
            asker = Asker(model_dir, dtype, max_new_tokens=max_new_tokens)
            parts = (asker.answer(task) for task in tasks)
        else:
            from vaemo.cluster import map_on_actors

            parts = map_on_actors(
                Asker, (str(model_dir), dtype, int(cpus_per_actor), max_new_tokens), "answer", tasks, actors, cpus_per_actor
            )
        for done, part in enumerate(parts, 1):
            answers.extend(part)
            update(done)
    order = {str(c): i for i, c in enumerate(clips)}
    return sorted(answers, key=lambda a: order[a.clip])


def add_ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model export folder (RUN_DIR/export)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--clip", help="one clip file to ask about")
    which.add_argument("--clips", help="a folder of clips (searched recursively) or a glob; needs --out")
    p.add_argument("--out", help="with --clips: write one JSON object per clip to this .jsonl file")
    p.add_argument("--modality", choices=MODALITIES, default="audio_visual", help="what the model is given")
    p.add_argument("--question", default=DEFAULT_QUESTION, help=f"default: {DEFAULT_QUESTION!r}")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on a GPU that has it, else fp32")
    p.add_argument("--max-new-tokens", type=int, default=0, help="answer length cap (default: the export's)")
    p.add_argument("--actors", type=int, default=2, help="with --clips: Ray actors (0: in this process)")
    p.add_argument(
        "--json", action="store_true", help="end with one JSON line: the answer (--clip), or the counts and the file (--clips)"
    )


def run_ask(args: argparse.Namespace) -> int:
    model_dir = check_model_dir(args.model)
    if not args.question.strip():
        raise UserError("--question is empty")
    if args.max_new_tokens < 0 or args.actors < 0:
        raise UserError("--max-new-tokens and --actors must be >= 0")
    check_question_fits(model_dir, args.question, args.modality, args.max_new_tokens)
    if args.clips is not None:
        if not args.out:
            raise UserError("--clips needs --out FILE.jsonl")
        out = output_file(args.out)  # before the answering, not after it
        clips = find_clips(args.clips)
        answers = ask_many(model_dir, clips, args.modality, args.question, args.dtype, args.actors, args.max_new_tokens)
        with open(out, "w") as f:
            for a in answers:
                f.write(json.dumps(asdict(a)) + "\n")
        failed = Counter(a.error for a in answers if a.error)
        reasons = ", ".join(f"{reason} {n}" for reason, n in failed.most_common())
        if failed.total() == len(answers):  # a wrong folder or --modality: nothing was answered
            raise UserError(f"--clips '{args.clips}': none of its {len(answers)} clip(s) could be used ({reasons}); see {out}")
        progress.log(
            f"wrote {len(answers)} answer(s) to {out}"
            + (f"; {failed.total()} clip(s) could not be used (see their `error`): {reasons}" if failed else "")
        )
        if args.json:
            summary = {"out": str(out), "clips": len(answers), "answered": len(answers) - failed.total()}
            print(json.dumps({**summary, "failed_by_reason": dict(failed.most_common())}))
        return 0
    clip = Path(args.clip).expanduser()
    if not clip.is_file():
        raise UserError(f"--clip '{args.clip}' is not a file")
    result = Asker(model_dir, args.dtype, max_new_tokens=args.max_new_tokens).answer(
        [(str(clip.resolve()), args.modality, args.question)]
    )[0]
    if result.error:
        # A painting has nothing to hear and a piece of music nothing to see: say what to ask instead.
        other = {"no_audio_stream": "; ask with --modality visual", "no_video_stream": "; ask with --modality audio"}
        raise UserError(
            f"--clip '{args.clip}' cannot be used: {SKIP_REASONS[result.error]} ({result.error}){other.get(result.error, '')}"
        )
    print(result.answer)
    if result.valence is not None:
        print(f"valence {result.valence:+.2f}, arousal {result.arousal:+.2f} (in [-1, 1])")
    if args.json:
        print(json.dumps(asdict(result)))
    return 0


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
