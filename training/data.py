"""Datasets in LLaVA's JSON format, read lazily, with bad samples skipped and counted.

A file is a JSON list of records or JSONL, one record a line:

    {"id": "0001",
     "image": "screens/0001.png" | ["a.png", "b.png"],       # optional
     "video": ["f0.png", "f1.png", ...] | [[...], [...]],    # optional: frames of one or more videos
     "tiles": false,                                          # optional: each image also as tiles
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the code?"},
                       {"from": "gpt", "value": "K7HX"}]}

Human turns mark where media go, as in LLaVA: one ``<image>`` per image and one
``<video>`` per video, in order. Rendering puts them in LongLLaVA's protocol
(``model.prompt``): an image is ``<img><image></img>``; a video is ``<vid>`` then each
frame's image markup joined by ``<t>``, then ``</vid>``; with ``"tiles": true`` an image
is the global view then its tower-sized tiles row by row. Paths are relative to the
dataset's image folder (the file's own folder by default).

Records are checked when the file is read (structure, roles, marker counts): a bad one
is dropped there. Images are read only when a sample is drawn: a missing or corrupt one
makes that sample a ``Skipped``, which the collator counts. Either way the run goes on,
and each bad sample is named once in the log.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from model.prompt import IMAGE_MARKUP, IMAGE_PLACEHOLDER, as_rgb, highres_markup, tile_image, video_markup

log = logging.getLogger(__name__)

VIDEO_PLACEHOLDER = "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Record:
    """A checked record; its media are paths, read when the sample is drawn."""

    id: str
    turns: tuple[tuple[str, str], ...]  # (role, text), roles alternating from "user"
    images: tuple[Path, ...]
    videos: tuple[tuple[Path, ...], ...]
    tiles: bool = False


@dataclass(frozen=True)
class Example:
    """A record rendered for the model: turns in LongLLaVA markup and its images in order."""

    id: str
    turns: tuple[tuple[str, str], ...]
    images: tuple[PILImage.Image, ...]
    mask_history: bool = False  # only the last answer is labelled (LLaMA-Factory's mask_history)


@dataclass(frozen=True)
class Skipped:
    """A sample dropped when drawn, and why."""

    id: str
    reason: str


class BadRecord(ValueError):
    pass


def _paths(value: Any, folder: Path, what: str) -> tuple[Path, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
        raise BadRecord(f"{what} must be a path or a list of paths")
    return tuple(folder / p for p in items)


def _videos(value: Any, folder: Path) -> tuple[tuple[Path, ...], ...]:
    """One video (a list of frame paths) or several (a list of such lists)."""
    if not value:
        return ()
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
        return tuple(_paths(v, folder, "'video'") for v in value)
    return (_paths(value, folder, "'video'"),)


def parse_record(raw: Any, folder: Path, fallback_id: str) -> Record:
    """A ``Record`` from one decoded JSON value, or ``BadRecord`` saying what is wrong."""
    if not isinstance(raw, dict):
        raise BadRecord("a record must be a JSON object")
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("'conversations' must be a non-empty list")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise BadRecord(f"turn {k} must be {{'from': 'human' | 'gpt', 'value': str}}")
        role = ROLES[turn["from"]]
        if role != ("user", "assistant")[k % 2]:
            raise BadRecord(f"turn {k} is from {turn['from']!r}; turns must alternate, human first")
        if role == "assistant" and (IMAGE_PLACEHOLDER in turn["value"] or VIDEO_PLACEHOLDER in turn["value"]):
            raise BadRecord(f"turn {k}: media markers belong in human turns")
        turns.append((role, turn["value"]))
    if turns[-1][0] != "assistant":
        raise BadRecord("the last turn must be an answer")
    images = _paths(raw.get("image", []), folder, "'image'")
    videos = _videos(raw.get("video", []), folder)
    if any(not v for v in videos):
        raise BadRecord("a video needs at least one frame")
    text = "".join(t for _, t in turns)
    for marker, media in ((IMAGE_PLACEHOLDER, images), (VIDEO_PLACEHOLDER, videos)):
        if text.count(marker) != len(media):
            raise BadRecord(f"{text.count(marker)} {marker} markers but {len(media)} given")
    tiles = raw.get("tiles", False)
    if not isinstance(tiles, bool):
        raise BadRecord("'tiles' must be true or false")
    return Record(str(raw.get("id", fallback_id)), tuple(turns), images, videos, tiles)


def read_records(path: str | Path, image_folder: str | Path | None = None) -> tuple[list[Record], list[str]]:
    """The good records of a JSON or JSONL file, and a line about each bad one."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            entries = [(f"{path.name}[{i}]", raw) for i, raw in enumerate(json.loads(text))]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"{path.name}:{number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    entries.append((f"{path.name}:{number}", BadRecord(f"malformed JSON ({exc.msg})")))
    records, problems = [], []
    for where, raw in entries:
        try:
            if isinstance(raw, BadRecord):
                raise raw
            records.append(parse_record(raw, folder, where))
        except BadRecord as exc:
            problems.append(f"{where}: {exc}")
    return records, problems


def _load(path: Path) -> PILImage.Image:
    try:
        with PILImage.open(path) as image:
            image.load()
            return as_rgb(image, str(path))
    except FileNotFoundError:
        raise BadRecord(f"missing image {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as exc:
        raise BadRecord(f"corrupt image {path}: {exc}") from None


def render(record: Record, tile_size: int, mask_history: bool = False) -> Example:
    """Read the record's media and put them into its text as LongLLaVA markup."""
    images, videos = iter(record.images), iter(record.videos)
    loaded: list[PILImage.Image] = []
    turns = []
    for role, text in record.turns:
        out = []
        for k, video_part in enumerate(text.split(VIDEO_PLACEHOLDER)):
            if k:
                frames = [_load(p) for p in next(videos)]
                loaded += frames
                out.append(video_markup(len(frames)))
            for j, part in enumerate(video_part.replace(IMAGE_MARKUP, IMAGE_PLACEHOLDER).split(IMAGE_PLACEHOLDER)):
                if j:
                    image = _load(next(images))
                    if record.tiles:
                        whole, tiles, rows, cols = tile_image(image, tile_size)
                        loaded += [whole, *tiles]
                        out.append(highres_markup(rows, cols))
                    else:
                        loaded.append(image)
                        out.append(IMAGE_MARKUP)
                out.append(part)
        turns.append((role, "".join(out)))
    return Example(record.id, tuple(turns), tuple(loaded), mask_history)


class LlavaDataset(Dataset):
    """LLaVA-format files as one dataset; ``dataset[i]`` is an ``Example`` or a ``Skipped``.

    ``fraction`` keeps the first share of each file's records (a replay share of an
    earlier stage's data, say); ``tile_size`` is the vision tower's input size;
    ``mask_history`` labels only each conversation's last answer (an agent's decision at
    the end of an episode, say, which its many earlier answers would otherwise outweigh).
    """

    def __init__(self, paths: list[str | Path], tile_size: int = 336, image_folder: str | Path | None = None,
                 fraction: float = 1.0, mask_history: bool = False):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        self.records: list[Record] = []
        self.problems: list[str] = []
        for path in paths:
            records, problems = read_records(path, image_folder)
            self.records += records[: max(1, round(len(records) * fraction))] if records else []
            self.problems += problems
        for problem in self.problems:
            log.warning("skipping record %s", problem)
        self.tile_size, self.mask_history = tile_size, mask_history

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example | Skipped:
        record = self.records[i]
        try:
            return render(record, self.tile_size, self.mask_history)
        except BadRecord as exc:
            return Skipped(record.id, str(exc))
