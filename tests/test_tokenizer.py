"""Byte tokenizer, HF ``tokenizers`` wrapper, chat prompt (spec §8) and streaming detokenisation."""

import json

import pytest

from nvfp4jax.config import preset
from nvfp4jax.tokenizer import (ASSISTANT, BOS, BYTE_SPECIALS, END_THINK, EOS, NUM_SPECIALS, THINK, USER,
                                ByteTokenizer, HFTokenizer, StreamDecoder, chat_prompt)


def test_chat_prompt_matches_the_dsv4_encoding():
    assert chat_prompt("Hi") == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"
    assert chat_prompt("Hi", "Be brief.", thinking=True) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜><think>")


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    cfg = preset("tiny")
    assert (tok.bos_id, tok.eos_id) == (cfg.bos_token_id, cfg.eos_token_id) == (0, 1)
    assert tok.vocab_size <= cfg.vocab_size
    assert tok.encode("hi") == [NUM_SPECIALS + ord("h"), NUM_SPECIALS + ord("i")]
    text = "héllo, 世界 \x00\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(NUM_SPECIALS <= i < NUM_SPECIALS + 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_specials_in_text():
    tok = ByteTokenizer()
    ids = tok.encode(chat_prompt("ab"))
    ref = BYTE_SPECIALS.index
    assert ids == [ref(BOS), ref(USER), NUM_SPECIALS + 97, NUM_SPECIALS + 98, ref(ASSISTANT), ref(END_THINK)]
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == chat_prompt("ab")
    assert tok.decode(ids, skip_special=True) == "ab"
    assert tok.decode([tok.eos_id, 300]) == EOS + "<|300|>"
    with pytest.raises(ValueError, match="negative"):
        tok.decode([-1])


def test_stream_decoder_holds_back_partial_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("a€b")  # € is three bytes
    dec = StreamDecoder(tok)
    pieces = [dec.push([i]) for i in ids]
    assert pieces == ["a", "", "", "€", "b"]
    assert dec.flush() == ""
    dec = StreamDecoder(tok)
    assert dec.push(ids[:2]) == "a"
    assert dec.flush() == "\ufffd"  # an unfinished character is shown at the end


def _write_hf_tokenizer(tmp_path, with_config: bool):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "Ġworld": 3, "Ġ": 4}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, USER, ASSISTANT, THINK, END_THINK])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    if with_config:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"add_bos_token": False, "bos_token": {"content": BOS}, "eos_token": EOS}))
    return path


@pytest.mark.parametrize("with_config", [False, True])
def test_hf_tokenizer_encodes_template_specials(tmp_path, with_config):
    path = _write_hf_tokenizer(tmp_path, with_config)
    tok = HFTokenizer(path)
    assert (tok.bos_id, tok.eos_id) == (5, 6)  # added after the 5 vocabulary words
    ids = tok.encode(chat_prompt("hello world"))
    assert ids == [5, 7, 1, 3, 8, 10]  # BOS User hello Ġworld Assistant </think>; no BOS added by encoding
    assert tok.decode(ids, skip_special=True) == "hello world"
    assert HFTokenizer(tmp_path).encode("hello") == [1]  # a directory holding tokenizer.json


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        HFTokenizer(tmp_path / "missing.json")
    path = _write_hf_tokenizer(tmp_path, with_config=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match="no BOS token '<s>'"):
        HFTokenizer(path)
