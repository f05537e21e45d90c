"""The one checkpoint format: a directory written atomically.

    config.json          HMSTConfig (JSON)
    model.safetensors    weights
    tokenizer.json       the tokenizer the model was trained with
    trainer_state.json   step, epoch, best val loss, ... (training checkpoints only)
    trainer_state.pt     optimizer/scheduler/sampler/RNG tensors, read with weights_only

A save writes `<dir>.tmp`, then swaps it in with renames; a crash at any point leaves
the previous checkpoint loadable (as `<dir>`, or as `<dir>.old` between the two
renames, which `resolve` falls back to). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from hmst.configs.model_config import HMSTConfig
from hmst.models.base_moe import BaseMoEModel
from hmst.tokenizer import HMSTTokenizer

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.pt"


def _fsync_dir_files(path: str) -> None:
    """fsync every file under `path` (sub-directories too: a saved system nests
    component directories)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def write_dir_atomic(path: str, write_fn) -> None:
    """Call `write_fn(tmp_dir)`, then atomically replace `path` with it."""
    path = path.rstrip("/")
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_fn(tmp)
    _fsync_dir_files(tmp)
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def resolve(path: str) -> str:
    """The directory to read for checkpoint `path` (falls back to an interrupted swap's
    `.old`); raises FileNotFoundError with the path if there is none."""
    path = path.rstrip("/")
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return path
    if os.path.isfile(os.path.join(path + ".old", CONFIG_FILE)):
        return path + ".old"
    if os.path.isdir(path):
        raise FileNotFoundError(f"not a checkpoint (no {CONFIG_FILE}): {path}")
    raise FileNotFoundError(f"checkpoint not found: {path}")


def save_checkpoint(
    path: str,
    model: BaseMoEModel,
    config: HMSTConfig,
    tokenizer: HMSTTokenizer | None,
    state_meta: dict | None = None,
    state_tensors: dict | None = None,
) -> None:
    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"tokenizer vocab {tokenizer.vocab_size} != "
            f"model vocab {model.config.vocab_size}"
        )

    def write(tmp):
        config.save(os.path.join(tmp, CONFIG_FILE))
        st_save_model(model, os.path.join(tmp, MODEL_FILE))
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, TOKENIZER_FILE))
        if state_meta is not None:
            with open(os.path.join(tmp, STATE_JSON), "w") as f:
                json.dump(state_meta, f, indent=2)
        if state_tensors is not None:
            torch.save(state_tensors, os.path.join(tmp, STATE_TENSORS))

    write_dir_atomic(path, write)


def save_model_dir(path: str, model: BaseMoEModel, tokenizer=None) -> None:
    """Weights + config (+ tokenizer) only: what `from_pretrained` needs."""
    save_checkpoint(path, model, HMSTConfig(model=model.config), tokenizer)


def load_config(path: str) -> HMSTConfig:
    return HMSTConfig.load(os.path.join(resolve(path), CONFIG_FILE))


def load_model(
    path: str, device=None, config: HMSTConfig | None = None
) -> BaseMoEModel:
    path = resolve(path)
    config = config or load_config(path)
    model = BaseMoEModel(config=config.model)
    file = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint {path} has no {MODEL_FILE}")
    try:
        missing, unexpected = st_load_model(model, file, strict=False, device="cpu")
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ValueError(f"corrupt checkpoint {file}: {e}") from None
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {file} does not match its config: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    return model.to(device) if device is not None else model


def load_tokenizer(path: str, expect_vocab: int | None = None) -> HMSTTokenizer:
    tok = HMSTTokenizer.load(os.path.join(resolve(path), TOKENIZER_FILE))
    if expect_vocab is not None and tok.vocab_size != expect_vocab:
        raise ValueError(
            f"tokenizer vocab {tok.vocab_size} does not match "
            f"the model's {expect_vocab}"
        )
    return tok


def load_pretrained(path: str, device=None):
    """(model, tokenizer, config) of a checkpoint directory, checked for consistency."""
    config = load_config(path)
    model = load_model(path, device=device, config=config)
    return model, load_tokenizer(path, config.model.vocab_size), config


def load_trainer_state(path: str) -> tuple[dict, dict]:
    path = resolve(path)
    meta_file, tensor_file = os.path.join(path, STATE_JSON), os.path.join(
        path, STATE_TENSORS
    )
    if not (os.path.isfile(meta_file) and os.path.isfile(tensor_file)):
        raise FileNotFoundError(
            f"{path} is not a training checkpoint (no trainer state)"
        )
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        tensors = torch.load(tensor_file, weights_only=True, map_location="cpu")
    except (json.JSONDecodeError, RuntimeError, EOFError) as e:
        raise ValueError(f"corrupt trainer state in {path}: {e}") from None
    return meta, tensors
