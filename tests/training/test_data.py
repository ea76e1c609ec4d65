"""LLaVA-format loading, rendering into LongLLaVA markup, labels, and bad data."""

import logging

import pytest

from model.prompt import EOS_TOKEN, IMAGE_TOKEN_INDEX, highres_markup, render_pieces, tile_image, user_turn, assistant_turn
from model.tokenizer import ByteTokenizer, tokenize_prompt
from training.collate import IGNORE_INDEX, Collator, encode
from training.data import Example, LlavaDataset, Skipped, read_records

from training_fixtures import TINY, qa, write_image, write_jsonl

TOKENIZER = ByteTokenizer()


def answers_of(record: dict) -> list[str]:
    return [t["value"] for t in record["conversations"] if t["from"] == "gpt"]


@pytest.mark.parametrize("kind", ["text", "single", "multi", "video", "tiles"])
def test_only_answers_and_their_eos_are_labelled(tmp_path, kinds, kind):
    record = kinds[kind]
    dataset = LlavaDataset([write_jsonl(tmp_path / "d.jsonl", [record])], tile_size=84)
    example = dataset[0]
    assert isinstance(example, Example)
    encoded = encode(example, TOKENIZER, TINY.image_tokens)

    # the ids are the whole conversation in LongLLaVA's template, tokenised at once
    template = "".join(user_turn(t) if r == "user" else assistant_turn(t) for r, t in example.turns)
    assert encoded.input_ids == tokenize_prompt(TOKENIZER, template)
    # one position per text token, image_tokens per image
    n_images = encoded.input_ids.count(IMAGE_TOKEN_INDEX)
    assert n_images == len(example.images)
    assert encoded.length == len(encoded.input_ids) - n_images + n_images * TINY.image_tokens
    # the labelled tokens are exactly each answer followed by EOS, in order
    labelled = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert labelled == [t for a in answers_of(record) for t in TOKENIZER.encode(a + EOS_TOKEN)]
    # and they sit where the answers sit: every label equals the token at its position
    position_tokens = [t for i in encoded.input_ids for t in ([None] * TINY.image_tokens if i == IMAGE_TOKEN_INDEX else [i])]
    assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(encoded.labels, position_tokens))
    assert all(label == IGNORE_INDEX for label, tok in zip(encoded.labels, position_tokens) if tok is None)


@pytest.mark.parametrize("mask_history", [False, True])
def test_mask_history_labels_only_the_last_answer(tmp_path, mask_history):
    """An episode as one conversation: every reply is labelled, or with ``mask_history``
    (LLaMA-Factory's option) only the last one; the ids are the same either way."""
    image = write_image(tmp_path / "a.png", seed=0)
    turns = [("<image>\nKeep it in mind.", "wait()"), ("<image>\nType it.", 'type("AB12")')]
    record = {"image": [image, image],
              "conversations": [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))]}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    encoded = encode(LlavaDataset([path], tile_size=84, mask_history=mask_history)[0], TOKENIZER, TINY.image_tokens)
    plain = encode(LlavaDataset([path], tile_size=84)[0], TOKENIZER, TINY.image_tokens)

    labelled = [t for t in encoded.labels if t != IGNORE_INDEX]
    answers = ['type("AB12")'] if mask_history else ["wait()", 'type("AB12")']
    assert labelled == [t for a in answers for t in TOKENIZER.encode(a + EOS_TOKEN)]
    assert encoded.input_ids == plain.input_ids


def test_markup_follows_the_prompt_protocol(tmp_path, kinds):
    records = [kinds["multi"], kinds["video"], kinds["tiles"]]
    multi, video, tiles = LlavaDataset([write_jsonl(tmp_path / "d.jsonl", records)], tile_size=84)
    assert multi.turns[0][1] == "<img><image></img><img><image></img>\nSame?"
    assert video.turns[0][1] == "<vid><img><image></img><t><img><image></img><t><img><image></img></vid>\nHow many frames?"
    _, tile_list, rows, cols = tile_image(tiles.images[0], 84)
    assert (rows, cols) == (2, 3)
    assert tiles.turns[0][1] == highres_markup(rows, cols) + "\nRead it."
    assert len(tiles.images) == 1 + rows * cols
    # the same text and images as the engine's own prompt pieces would give
    from model.prompt import HighResImage, Text

    text, images = render_pieces([HighResImage(tiles.images[0], tile=84), Text("\nRead it.")])
    assert text == tiles.turns[0][1] and [im.size for im in images] == [im.size for im in tiles.images]


def test_bare_and_wrapped_image_markers_render_alike(tmp_path):
    name = write_image(tmp_path / "a.png", 0)
    bare, wrapped = LlavaDataset([write_jsonl(tmp_path / "d.jsonl", [
        qa("<image>\nq", "a", image=name), qa("<img><image></img>\nq", "a", image=name)])])
    assert bare.turns == wrapped.turns


def test_bad_records_are_dropped_with_a_reason(tmp_path, caplog):
    name = write_image(tmp_path / "a.png", 0)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([
        '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}',
        '{"conversations": [{"from": "human", "value": "cut off"',  # malformed JSON
        f'{{"image": "{name}", "conversations": [{{"from": "human", "value": "no marker"}}, {{"from": "gpt", "value": "x"}}]}}',
        '{"conversations": [{"from": "gpt", "value": "answer first"}, {"from": "human", "value": "q"}]}',
        '{"conversations": [{"from": "human", "value": "no answer"}]}',
        '[1, 2]',
    ]) + "\n")
    with caplog.at_level(logging.WARNING):
        dataset = LlavaDataset([path])
    assert len(dataset) == 1
    assert len(dataset.problems) == 5
    assert "d.jsonl:2: malformed JSON" in dataset.problems[0]
    assert "0 <image> markers but 1 given" in dataset.problems[1]
    assert "must alternate" in dataset.problems[2]
    assert all(p in caplog.text for p in dataset.problems)


def test_json_list_files_load_too(tmp_path, kinds):
    path = tmp_path / "d.json"
    import json

    path.write_text(json.dumps([kinds["text"], kinds["single"]]))
    records, problems = read_records(path)
    assert len(records) == 2 and not problems


def test_missing_and_corrupt_images_are_skipped_when_drawn(tmp_path):
    good = write_image(tmp_path / "good.png", 0)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = write_jsonl(tmp_path / "d.jsonl", [
        qa("<image>\nq", "a", image=good, id="good"),
        qa("<image>\nq", "a", image="missing.png", id="missing"),
        qa("<image>\nq", "a", image="corrupt.png", id="corrupt"),
    ])
    dataset = LlavaDataset([path])
    assert len(dataset) == 3  # images are read only when drawn
    drawn = [dataset[i] for i in range(3)]
    assert isinstance(drawn[0], Example)
    assert isinstance(drawn[1], Skipped) and "missing image" in drawn[1].reason
    assert isinstance(drawn[2], Skipped) and "corrupt image" in drawn[2].reason
    batch = Collator(TINY, TOKENIZER, max_length=512)(drawn)
    assert len(batch) == 1 and [s.id for s in batch.skipped] == ["missing", "corrupt"]


def test_collator_pads_right_and_drops_overlong_samples(tmp_path, kinds):
    dataset = LlavaDataset([write_jsonl(tmp_path / "d.jsonl", [kinds["text"], kinds["single"], kinds["multi"]])])
    samples = [dataset[i] for i in range(3)]
    lengths = [encode(s, TOKENIZER, 36).length for s in samples]
    batch = Collator(TINY, TOKENIZER, max_length=sorted(lengths)[1])(samples)
    assert batch.lengths == sorted(lengths)[:2] and len(batch.skipped) == 1
    assert "over max_length" in batch.skipped[0].reason
    assert batch.labels.shape == (2, max(batch.lengths))
    assert batch.pixels.shape == (1, 3, 84, 84) and batch.images_per_sample == [0, 1]
