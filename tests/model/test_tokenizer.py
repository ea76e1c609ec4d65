"""Tokenizers: the byte tokenizer, a real local tokenizer.json, prompt tokenisation, streaming."""

import json

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.prompt import IMAGE_TOKEN_INDEX
from model.tokenizer import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    HFTokenizer,
    IncrementalDecoder,
    load_tokenizer,
    tokenize_prompt,
)

TEXT = "héllo wörld, 世界 🎉 ok"
CORPUS = ["hello world", "the screen shows a button", "click the button", "héllo wörld 世界", "type hello"] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here, with LongLLaVA's specials at ids 0..3."""
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    rust.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tok")
    rust.save(str(path / "tokenizer.json"))
    return path


# ---------------------------------------------------------------------------- byte tokenizer
def test_byte_tokenizer_round_trips_utf8_and_specials():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 260)
    ids = tok.encode(TEXT)
    assert ids == [b + 4 for b in TEXT.encode("utf-8")] and tok.decode(ids) == TEXT
    chat = "<|startoftext|><|User|>\nhi<|endoftext|><|pad|><|unk|>"
    ids = tok.encode(chat)
    assert ids[0] == 1 and ids[-3:] == [2, 0, 3] and tok.encode("<|User|>")[0] == ord("<") + 4
    assert tok.decode(ids) == chat
    assert tok.decode(ids, skip_special=True) == "<|User|>\nhi"
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_byte_tokenizer_decodes_invalid_utf8_with_replacement_and_rejects_bad_ids():
    tok = ByteTokenizer()
    assert tok.decode([0xFF + 4, ord("a") + 4]) == "\ufffda"
    assert tok.decode(tok.encode("世")[:2]) == "\ufffd"
    with pytest.raises(ValueError, match=r"\[0, 260\)"):
        tok.decode([5, 260])
    with pytest.raises(ValueError, match=r"-200"):
        tok.decode([IMAGE_TOKEN_INDEX])


def test_tokenize_prompt_puts_image_index_between_chunks():
    tok = ByteTokenizer()
    ids = tokenize_prompt(tok, "<image>a<img><image></img><image>")
    img, end = tok.encode("<img>"), tok.encode("</img>")
    assert ids == [IMAGE_TOKEN_INDEX, ord("a") + 4, *img, IMAGE_TOKEN_INDEX, *end, IMAGE_TOKEN_INDEX]
    assert tokenize_prompt(tok, "no images") == tok.encode("no images")


# ---------------------------------------------------------------------------- streaming
def stream(tok, ids):
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.feed(i) for i in ids]
    return pieces, decoder.finish()


def test_incremental_decoding_never_emits_partial_characters():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT + "<|endoftext|>")
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == TEXT + "<|endoftext|>" and rest == ""
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["h", "", "é"]  # é is two bytes: nothing until the second arrives
    emoji = tok.encode("🎉")
    assert [p for p in stream(tok, emoji)[0]] == ["", "", "", "🎉"]


def test_incremental_decoding_flushes_an_unfinished_character_at_the_end():
    tok = ByteTokenizer()
    pieces, rest = stream(tok, tok.encode("ab世")[:-1])
    assert pieces == ["a", "b", "", ""] and rest == "\ufffd"


# ---------------------------------------------------------------------------- tokenizer.json
def test_hf_tokenizer_from_a_local_tokenizer_json(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == RustTokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    ids = tok.encode("<|startoftext|>click the button<|endoftext|>")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) < 10  # merges were learnt
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode(ids, skip_special=True) == "click the button"
    assert load_tokenizer(tokenizer_dir / "tokenizer.json").encode(TEXT) == tok.encode(TEXT)
    prompt = tokenize_prompt(tok, "<|startoftext|>look<image>ok")
    assert prompt == [1, *tok.encode("look"), IMAGE_TOKEN_INDEX, *tok.encode("ok")]
    with pytest.raises(ValueError, match="token ids must lie"):
        tok.decode([tok.vocab_size])


def test_hf_tokenizer_streams_whole_characters(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ids = tok.encode(TEXT)
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == TEXT and all("\ufffd" not in p for p in pieces)


def test_directory_without_tokenizer_json_goes_through_transformers(tokenizer_dir, tmp_path):
    """A GPT-2 style vocab.json + merges.txt directory: transformers builds it, no sentencepiece needed."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]))
    merges = ["#version: 0.2", *(m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"])]
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n")
    names = dict(zip(["pad_token", "bos_token", "eos_token", "unk_token"], SPECIAL_TOKENS))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", **names}))
    tok = load_tokenizer(tmp_path)
    reference = load_tokenizer(tokenizer_dir)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "<|startoftext|>click the button<|endoftext|>"
    assert tok.encode(text) == reference.encode(text) and tok.decode(tok.encode(TEXT)) == TEXT


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"{tmp_path} has no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "bad")
    with pytest.raises(ValueError, match="unknown built-in tokenizer"):
        load_tokenizer(None, builtin="sentencepiece")


def test_tokenizer_without_longllava_specials_is_refused(tmp_path):
    rust = RustTokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    rust.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer.json: the vocabulary lacks LongLLaVA's special tokens"):
        load_tokenizer(tmp_path)


def test_builtin_byte_tokenizer_wins_and_none_means_bytes(tokenizer_dir):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(tokenizer_dir, builtin="byte"), ByteTokenizer)


def test_sentencepiece_directory_like_longllavas_loads(tmp_path):
    """LongLLaVA ships tokenizer.model (sentencepiece) and a LlamaTokenizer config, no tokenizer.json."""
    import sentencepiece as spm

    sentences = ["the quick brown fox jumps over the lazy dog", "click the button", "type the code 4821"] * 40
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "tokenizer"), vocab_size=320,
        model_type="bpe", byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece="<|pad|>", bos_piece="<|startoftext|>", eos_piece="<|endoftext|>", unk_piece="<|unk|>",
        minloglevel=2,
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": False}))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("<|startoftext|>click the button<|endoftext|>")
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2 and len(ids) < 20
    assert tok.decode(ids) == "<|startoftext|>click the button<|endoftext|>"
