"""The words of the ArtEmo-Synth world: latent factors, captions, and the questions asked about a clip.

Everything textual that training and the benchmark use comes from here, so the tiny tokenizer can be
trained on exactly this language and the benchmark asks exactly what training taught.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vaemo.data.bench import mcq_prompt

EMOTIONS: tuple[str, ...] = ("joy", "calm", "anger", "sadness")
OBJECTS: tuple[str, ...] = ("circle", "square", "triangle", "star")
# (sign of valence, sign of arousal) per emotion, from the spec's table.
EMOTION_SIGNS: dict[str, tuple[int, int]] = {"joy": (1, 1), "calm": (1, -1), "anger": (-1, 1), "sadness": (-1, -1)}
TIMBRE_WORDS: dict[str, str] = {
    "circle": "pure sine",
    "square": "hollow square",
    "triangle": "buzzy sawtooth",
    "star": "plucked string",
}
PLURALS: dict[str, str] = {o: o + "s" for o in OBJECTS}
COUNT_WORDS = {1: "one", 2: "two"}

TASKS: tuple[str, ...] = ("content", "emotion")
QUESTIONS: dict[str, str] = {
    "content": "Which shape is this artwork about?",
    "emotion": "Which emotion does this artwork convey?",
}
# Training paraphrases; the benchmark asks the canonical QUESTIONS above.
QUESTION_VARIANTS: dict[str, tuple[str, ...]] = {
    "content": (QUESTIONS["content"], "What shape is in this artwork?", "Name the shape in this artwork."),
    "emotion": (QUESTIONS["emotion"], "What feeling does this artwork express?", "Name the emotion of this artwork."),
}
DESCRIBE_PROMPTS: tuple[str, ...] = ("Describe this artwork.", "Describe what you perceive.", "What is this artwork like?")
OPTIONS: dict[str, tuple[str, ...]] = {"content": OBJECTS, "emotion": EMOTIONS}


@dataclass
class Cues:
    """What a caption says about a clip: the object, count, emotion and the perceptual cues."""

    object: str
    count: int
    emotion: str
    valence: float
    arousal: float

    @property
    def warm(self) -> str:
        return "warm" if self.valence > 0 else "cool"

    @property
    def bright(self) -> str:
        return "bright" if self.valence > 0 else "dark"

    @property
    def mode(self) -> str:
        return "major" if self.valence > 0 else "minor"

    @property
    def speed(self) -> str:
        return "fast" if self.arousal > 0 else "slow"


_TEMPLATES = (
    "{count} {things} {drift} {speed} over a {bright}, {warm} background while {timbre} notes play a {speed} "
    "{mode} arpeggio. It feels {emotion}.",
    "A {emotion} artwork: {count} {things} on a {warm}, {bright} gradient, moving {speed}, with {speed} {mode} {timbre} tones.",
    "{emotion} mood. {count} {things}, {warm} and {bright} colours, {speed} motion, and a {speed} {mode} melody of "
    "{timbre} notes.",
    "The artwork shows {count} {things} moving {speed} across {bright} {warm} colours; {timbre} sounds form a {mode} "
    "chord at a {speed} tempo, so it feels {emotion}.",
)


def caption(cues: Cues, rng: np.random.Generator) -> str:
    """A caption naming the object, count, emotion and cues (warm/cool, bright/dark, fast/slow, major/minor)."""
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    things = cues.object if cues.count == 1 else PLURALS[cues.object]
    text = template.format(
        count=COUNT_WORDS[cues.count],
        things=things,
        drift="drifts" if cues.count == 1 else "drift",
        speed=cues.speed,
        bright=cues.bright,
        warm=cues.warm,
        timbre=TIMBRE_WORDS[cues.object],
        mode=cues.mode,
        emotion=cues.emotion,
    )
    return text[0].upper() + text[1:]


def shuffled_options(task: str, rng: np.random.Generator) -> list[str]:
    options = list(OPTIONS[task])
    rng.shuffle(options)
    return options


def corpus(seed: int = 0, captions: int = 3000) -> list[str]:
    """Every kind of text the synthetic world produces; the tiny tokenizer is trained on it."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(captions):
        emotion = EMOTIONS[int(rng.integers(4))]
        sv, sa = EMOTION_SIGNS[emotion]
        cues = Cues(OBJECTS[int(rng.integers(4))], int(rng.integers(1, 3)), emotion, float(sv), float(sa))
        lines.append(caption(cues, rng))
    for task in TASKS:
        for question in QUESTION_VARIANTS[task]:
            for _ in range(8):
                lines.append(mcq_prompt(question, shuffled_options(task, rng)))
        lines.extend(OPTIONS[task])
    lines.extend(DESCRIBE_PROMPTS)
    return lines
