"""Score ArtEmoBench items with one model replica (what each evaluation actor runs).

Items are scored by the length-normalised log-likelihood of each option, all options of a batch of
items in one forward pass. Items come in chunks grouped by clip, so a clip is decoded once, and passes the
vision tower and the audio encoder once, for all the questions asked about it (an audio question hears
the same window as the audio-visual one). An item whose media cannot be decoded is skipped and counted.

The deaf check asks the audio items again with the soundtrack of another clip (a seeded derangement):
a model that really listens answers for the other clip, so it falls to chance against the item's own
answer and matches its normal audio accuracy against the donor clip's answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from vaemo.config import DataConfig
from vaemo.data.bench import BenchItem, mcq_prompt
from vaemo.data.decode import CLIP_EXTENSIONS, DecodeSpec, SkipSample, decode_sample
from vaemo.data.watchdog import decode_within
from vaemo.model import VAEmotionLLM
from vaemo.model.vaemo_llm import best_option


@dataclass
class Task:
    """One item to score; `audio_from` names another clip's soundtrack for the deaf check, and
    `donor_answer` the index among this item's options of that clip's answer (-1: not among them)."""

    item: BenchItem
    deaf: bool = False
    audio_from: Path | None = None
    donor_answer: int = -1


@dataclass
class ItemResult:
    id: str
    modality: str
    task: str
    deaf: bool
    skipped: bool
    correct: bool = False
    predicted: int = -1
    answer: int = -1
    options: int = 0
    scores: list | None = None
    valence: float | None = None  # truth
    arousal: float | None = None
    valence_pred: float | None = None
    arousal_pred: float | None = None
    media: str = ""
    reason: str = ""
    donor_answer: int = -1  # deaf check: the right option for the clip whose soundtrack was played

    @property
    def donor_correct(self) -> bool:
        return self.donor_answer >= 0 and self.predicted == self.donor_answer

    def to_dict(self) -> dict:
        return asdict(self)


def has_soundtrack(path: Path) -> bool:
    """Whether a clip's container holds an audio stream FFmpeg opens (its headers read, nothing decoded)."""
    from torchcodec.decoders import AudioDecoder

    try:
        AudioDecoder(str(path))
    except Exception:  # noqa: BLE001 (missing, unreadable, or no audio stream: no soundtrack to lend)
        return False
    return True


def deaf_sources(items: list[BenchItem], seed: int = 0) -> dict[Path, Path]:
    """For each clip asked under `audio` that has a soundtrack, another such clip whose soundtrack replaces it
    (no fixed points). A clip without one (a missing file, a painting) neither lends nor borrows: lent, it
    would leave the borrower's question unscored for a fault of the lender's."""
    clips = sorted(media for media in {i.media for i in items if i.modality == "audio"} if has_soundtrack(media))
    if len(clips) < 2:
        return {}
    order = np.random.default_rng(seed).permutation(len(clips))
    shifted = np.roll(order, 1)  # a cycle through a random order: every clip gets another one's audio
    return {clips[a]: clips[b] for a, b in zip(order, shifted)}


def plan(items: list[BenchItem], deaf_check: bool, chunk_items: int, seed: int = 0) -> list[list[Task]]:
    """Tasks in chunks of about `chunk_items`, each clip's questions kept together."""
    by_clip: dict[Path, list[Task]] = {}
    for item in items:
        by_clip.setdefault(item.media, []).append(Task(item))
    if deaf_check:
        sources = deaf_sources(items, seed)
        left_out = sorted({i.media for i in items if i.modality == "audio"} - set(sources))
        if left_out:
            from vaemo import progress

            progress.log(
                f"deaf check: {len(left_out)} clip(s) asked under audio have no soundtrack that opens here (e.g. "
                f"{left_out[0]}): they neither lend one nor borrow one"
            )
        truth = {(i.media, i.modality, i.task): i.options[i.answer] for i in items}
        for item in items:
            if item.modality == "audio" and item.media in sources:
                donor = truth.get((sources[item.media], item.modality, item.task))
                answer = list(item.options).index(donor) if donor in item.options else -1
                by_clip[item.media].append(Task(item, deaf=True, audio_from=sources[item.media], donor_answer=answer))
    chunks: list[list[Task]] = [[]]
    for clip in sorted(by_clip):
        if chunks[-1] and len(chunks[-1]) + len(by_clip[clip]) > chunk_items:
            chunks.append([])
        chunks[-1].extend(by_clip[clip])
    return [c for c in chunks if c]


def question_prompt(item: BenchItem) -> str:
    """The question as the model was trained to read it: the text, then its options in the item's order."""
    return mcq_prompt(item.question, list(item.options))


def load_replica(model_dir: str | Path, device: str = "auto", dtype: str = "auto") -> VAEmotionLLM:
    """One export on one device for inference (never under ZeRO-3); dtype auto: bf16 on a GPU that has it,
    else fp32 (`choose_dtype`)."""
    from vaemo.model import choose_attention, choose_dtype

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = choose_dtype(dtype)
    return (
        VAEmotionLLM.from_pretrained(model_dir, attn_implementation=choose_attention("auto", chosen), dtype=chosen)
        .to(device)
        .eval()
    )


def decode_spec(model: VAEmotionLLM) -> DecodeSpec:
    """Clips decoded the way the model was trained on them."""
    v = model.spec.visual
    return DecodeSpec(
        num_frames=v.num_frames,
        height=v.height,
        width=v.width,
        audio_seconds=model.spec.audio_seconds,
        audio_fill=model.spec.audio_fill,
        sampling=v.frame_sampling,
        pair_seconds=v.pair_seconds,
        fit=v.frame_fit,
    )


def decode_clip(path: Path, spec: DecodeSpec, video: bool, audio: bool):
    """(frames or None, 16 kHz audio or None, duration) of a clip file; SkipSample names what is wrong."""
    try:
        raw = path.read_bytes()
    except OSError:
        raise SkipSample("unreadable_media") from None
    if not raw:
        raise SkipSample("empty_clip")
    extension = path.suffix.lstrip(".").lower()  # FFmpeg reads the bytes whatever the name says
    sample = {"__key__": path.name, extension if extension in CLIP_EXTENSIONS else "mp4": raw}
    clip = decode_sample(sample, replace(spec, need_video=video, need_audio=audio))
    return clip.video, clip.audio, clip.duration


def streams_needed(task: Task) -> tuple[bool, bool]:
    """(frames, the clip's own soundtrack) that a task reads: a deaf-check task hears another clip's."""
    modality = task.item.modality
    return modality in ("visual", "audio_visual"), modality in ("audio", "audio_visual") and not task.deaf


def model_row(spec: DecodeSpec, frames: torch.Tensor | None, sound: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip's frames and soundtrack as one row of the model's inputs, a stream it lacks left blank (the
    questions asked of the row do not read it)."""
    video = frames if frames is not None else torch.zeros(spec.num_frames, 3, spec.height, spec.width, dtype=torch.uint8)
    return video, sound if sound is not None else torch.zeros(spec.audio_samples)


class Scorer:
    """One model replica on one device (never under ZeRO-3)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto"):
        self.model = load_replica(model_dir, device, dtype)
        self.spec = decode_spec(self.model)
        self.decode_limit_s = DataConfig().decode_timeout_s  # a clip that hangs FFmpeg is skipped, not waited on

    def _decode(self, path: Path, video: bool, audio: bool, cache: dict, wants: dict[Path, tuple[bool, bool]]) -> tuple:
        """The key in `cache` of the clip decoded with every stream the chunk asks of it (decoded once), or, if
        that fails, with just the streams asked now: a clip whose other stream fails still serves the
        questions that do not need it. The entry is (frames, sound, duration) or the reason for a skip."""
        for key in ((path, *wants[path]), (path, video, audio)):
            if key not in cache:
                try:
                    cache[key] = decode_within(
                        self.decode_limit_s, partial(decode_clip, path, self.spec, key[1], key[2]), str(path)
                    )
                except SkipSample as err:
                    cache[key] = err.reason
            if not isinstance(cache[key], str):
                return key
        return key

    @torch.no_grad()
    def score(self, tasks: list[Task]) -> list[ItemResult]:
        # One model row per clip (and per borrowed soundtrack): every question about a clip reads the same
        # row, so its frames and sound pass the vision tower and the audio encoder once, not once per question.
        wants: dict[Path, tuple[bool, bool]] = {}
        for task in tasks:
            had, needs = wants.get(task.item.media, (False, False)), streams_needed(task)
            wants[task.item.media] = (had[0] or needs[0], had[1] or needs[1])
            if task.deaf:
                wants.setdefault(task.audio_from, (False, True))
        cache: dict = {}
        row_of: dict[tuple, int] = {}
        rows, videos, audios, durations, results = [], [], [], [], []
        for task in tasks:
            item = task.item
            result = ItemResult(
                item.id,
                item.modality,
                item.task,
                task.deaf,
                skipped=False,
                answer=item.answer,
                options=len(item.options),
                valence=item.valence,
                arousal=item.arousal,
                media=str(item.media),
                donor_answer=task.donor_answer,
            )
            seen_key = self._decode(item.media, *streams_needed(task), cache, wants)
            heard_key = self._decode(task.audio_from, False, True, cache, wants) if task.deaf else seen_key
            seen, heard = cache[seen_key], cache[heard_key]
            problem = next((x for x in (seen, heard) if isinstance(x, str)), None)
            if problem:
                result.skipped, result.reason = True, problem
                results.append(result)
                continue
            key = (seen_key, heard_key)
            if key not in row_of:
                frames, sound, duration = seen
                if task.deaf:
                    sound = heard[1]
                video, audio = model_row(self.spec, frames, sound)
                videos.append(video)
                audios.append(audio)
                durations.append(duration)
                row_of[key] = len(videos) - 1
            rows.append((item.modality, question_prompt(item), item.options, row_of[key]))
            results.append(result)
        if rows:
            scores, pooled = self.model.score_options(rows, torch.stack(videos), torch.stack(audios), durations)
            va = self.model.supervisor(pooled)[0].float().cpu() if self.model.supervisor is not None else None
            scored = [r for r in results if not r.skipped]
            for k, (result, option_scores) in enumerate(zip(scored, scores)):
                result.scores = option_scores
                result.predicted = best_option(option_scores)
                result.correct = result.predicted == result.answer
                if va is not None:
                    result.valence_pred, result.arousal_pred = float(va[k, 0]), float(va[k, 1])
        return results
