"""Data tests run offline: no hub lookups (which would retry for a minute without network), and the
`datasets` arrow cache goes to a temporary folder instead of ~/.cache."""

import pytest


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub and datasets read the variable at import time; patch the imported flags too.
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    yield


@pytest.fixture
def write_files(tmp_path):
    """write_files({"rel/path.txt": "content", ...}) -> the folder holding them."""
    def write(files: dict, folder: str = "corpus"):
        root = tmp_path / folder
        for rel, content in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content, encoding="utf-8")
        root.mkdir(parents=True, exist_ok=True)
        return root
    return write


SENTENCES = ["the cat sat on the mat", "a dog sat on a log", "the dog saw the cat"]


def _make_local_tokenizer(path, bos=True, eos=True):
    """A tiny word-level transformers tokenizer, trained here and saved to `path` (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]"] + (["<s>"] if bos else []) + (["</s>"] if eos else [])
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                   bos_token="<s>" if bos else None, eos_token="</s>" if eos else None)
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture
def local_tokenizer(tmp_path):
    """local_tokenizer(bos=True, eos=True) -> path of a tiny word-level transformers tokenizer saved to disk."""
    return lambda **kw: _make_local_tokenizer(tmp_path / "tok", **kw)
