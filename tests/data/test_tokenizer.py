import pytest

from ttt_e2e.data import DataError, build_tokenizer

def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("bytes")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.name) == (258, 256, 257, "bytes")
    text = "héllo, wörld ✓\n\tdef f(): return 1"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # no special tokens added
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text  # specials are not text
    assert tok.encode_batch([text, "x"]) == [ids, [ord("x")]]


def test_transformers_tokenizer_from_local_path(local_tokenizer):
    path = local_tokenizer()
    tok = build_tokenizer(path)
    assert tok.name == path
    assert tok.bos_id == tok._tok.convert_tokens_to_ids("<s>")
    assert tok.eos_id == tok._tok.convert_tokens_to_ids("</s>")
    assert tok.bos_id != tok.eos_id
    assert tok.vocab_size == 3 + 9  # [UNK] <s> </s> + the words of the training sentences
    ids = tok.encode("the cat sat on the log")
    assert len(ids) == 6 and tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == "the cat sat on the log"
    assert tok.encode_batch(["the cat", "a dog"]) == [tok.encode("the cat"), tok.encode("a dog")]


def test_unknown_tokenizer_name():
    with pytest.raises(DataError, match=r"^unknown tokenizer 'xyz-no-such-tokenizer': ") as e:
        build_tokenizer("xyz-no-such-tokenizer")
    assert "\n" not in str(e.value)


def test_unknown_tokenizer_path(tmp_path):
    with pytest.raises(DataError, match=r"^unknown tokenizer '.*missing_tok': no such directory$"):
        build_tokenizer(str(tmp_path / "missing_tok"))


def test_tokenizer_without_eos(local_tokenizer):
    path = local_tokenizer(eos=False)
    with pytest.raises(DataError, match=r"tokenizer '.*' has no EOS token"):
        build_tokenizer(path)
