import os

import pytest
import torch

from conftest import tiny_config
from hmst import checkpoint as ckpt
from hmst.models.base_moe import BaseMoEModel


def test_save_load_identical_logits(tmp_path, tokenizer):
    model = BaseMoEModel(config=tiny_config()).eval()
    model.save_pretrained(str(tmp_path / "m"), tokenizer=tokenizer)
    again = BaseMoEModel.from_pretrained(str(tmp_path / "m")).eval()
    x = torch.randint(0, 300, (2, 16))
    assert torch.equal(model(x)["logits"], again(x)["logits"])
    _, tok, cfg = ckpt.load_pretrained(str(tmp_path / "m"))
    assert tok.hash() == tokenizer.hash() and cfg.model == model.config


def test_truncated_and_missing(tmp_path):
    BaseMoEModel(config=tiny_config()).save_pretrained(str(tmp_path / "m"))
    f = tmp_path / "m" / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        BaseMoEModel.from_pretrained(str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        BaseMoEModel.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "m" / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="corrupt config"):
        BaseMoEModel.from_pretrained(str(tmp_path / "m"))


def test_crash_during_save_keeps_previous(tmp_path):
    path = str(tmp_path / "last")
    first = BaseMoEModel(config=tiny_config())
    first.save_pretrained(path)

    def crash(tmp):
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # the process dies mid-write

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_dir_atomic(path, crash)
    x = torch.randint(0, 300, (1, 8))
    again = BaseMoEModel.from_pretrained(path)
    assert torch.equal(first.eval()(x)["logits"], again.eval()(x)["logits"])
    # killed between the two renames: only `<dir>.old` exists, and it is found
    os.rename(path, path + ".old")
    assert ckpt.resolve(path) == path + ".old"
    BaseMoEModel.from_pretrained(path)


def test_vocab_mismatch_on_save(tmp_path, tokenizer):
    model = BaseMoEModel(config=tiny_config(vocab_size=512))
    with pytest.raises(ValueError, match="vocab"):
        model.save_pretrained(str(tmp_path / "m"), tokenizer=tokenizer)
