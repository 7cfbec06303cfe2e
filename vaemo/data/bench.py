"""Read an ArtEmoBench folder (docs/data-formats.md): BENCH/items.jsonl + BENCH/media/...

A malformed items.jsonl is the user's input and fails with one line naming file and line; an item
whose media cannot be read is skipped and counted when it is scored, not here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vaemo.config import MODALITIES
from vaemo.errors import UserError, read_user_text


def mcq_prompt(question: str, options: list[str]) -> str:
    """The text of a multiple-choice question as the model sees it, in training and in scoring alike."""
    return f"{question} Options: {', '.join(options)}."


@dataclass
class BenchItem:
    id: str
    media: Path  # absolute path of the clip
    modality: str  # audio | visual | audio_visual
    task: str  # content | emotion | any other task name
    question: str
    options: list[str]
    answer: int
    valence: float | None = None
    arousal: float | None = None
    extra: dict = field(default_factory=dict)  # unknown fields, kept


_KNOWN = {"id", "media", "modality", "task", "question", "options", "answer", "valence", "arousal"}


def parse_item(entry: object, folder: Path, where: str) -> BenchItem:
    def bad(message: str) -> UserError:
        return UserError(f"{where}: {message}")

    if not isinstance(entry, dict):
        raise bad("each line must be a JSON object")
    for name in ("id", "media", "modality", "task", "question"):
        if not isinstance(entry.get(name), str) or not entry[name]:
            raise bad(f"field '{name}' must be a non-empty string")
    if Path(entry["media"]).is_absolute():  # a folder that moves (another machine, a cluster) keeps its media
        raise bad(f"field 'media' must be a path relative to the benchmark folder, got {entry['media']!r}")
    if entry["task"] == "all":
        raise bad("task 'all' is reserved: results.json's 'all' is the mean over all of a modality's items")
    if entry["modality"] not in MODALITIES:
        raise bad(f"field 'modality' must be one of {', '.join(MODALITIES)}, got {entry['modality']!r}")
    options = entry.get("options")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise bad("field 'options' must be a list of at least 2 non-empty strings")
    answer = entry.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
        raise bad(f"field 'answer' must be an index into options (0-{len(options) - 1}), got {answer!r}")
    va = {}
    for name in ("valence", "arousal"):
        value = entry.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not -1.0 <= value <= 1.0):
            raise bad(f"field '{name}' must be a number in [-1, 1], got {value!r}")
        va[name] = None if value is None else float(value)
    return BenchItem(
        id=entry["id"],
        media=(folder / entry["media"]).resolve(),
        modality=entry["modality"],
        task=entry["task"],
        question=entry["question"],
        options=list(options),
        answer=answer,
        extra={k: v for k, v in entry.items() if k not in _KNOWN},
        **va,
    )


def read_bench(folder: str | Path) -> list[BenchItem]:
    folder = Path(folder)
    items_path = folder / "items.jsonl"
    if not folder.is_dir():
        raise UserError(f"benchmark folder '{folder}' does not exist")
    if not items_path.is_file():
        raise UserError(f"benchmark folder '{folder}' has no items.jsonl")
    items: list[BenchItem] = []
    seen: set[str] = set()
    for number, line in enumerate(read_user_text(items_path, "benchmark").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{items_path}:{number}"
        try:
            entry = json.loads(line)
        except ValueError:
            raise UserError(f"{where}: not valid JSON") from None
        item = parse_item(entry, folder, where)
        if item.id in seen:
            raise UserError(f"{where}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise UserError(f"benchmark '{items_path}' holds no item")
    return items
