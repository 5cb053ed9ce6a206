"""A model that cannot be loaded is the user's input (exit 2, no retry) wherever it is loaded:
the trainer, hard-negative mining, evaluation and `embedtune run`'s check before it starts."""

from __future__ import annotations

import errno
import shutil
import socket
from pathlib import Path

import pytest

from embedtune.trainer.encoding import load_encoder
from embedtune.trainer.errors import InputError
from embedtune.trainer.model_loading import load_tokenizer_and_encoder, loading_model, worth_retrying


def _empty(tiny: Path, path: Path) -> None:
    path.mkdir()


def _config_only(tiny: Path, path: Path) -> None:
    path.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, path)


def _corrupt_weights(tiny: Path, path: Path) -> None:
    shutil.copytree(tiny, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an upload cut short


def _no_tokenizer(tiny: Path, path: Path) -> None:
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny / name, path)


def _missing(tiny: Path, path: Path) -> None:
    pass


BROKEN = {
    "empty folder": (_empty, "the folder is empty"),
    "config but no weights": (_config_only, "no file named model.safetensors"),
    "corrupt weights": (_corrupt_weights, "a .safetensors weights file is corrupt"),
    # transformers builds a tokenizer of special tokens only: every word would become [UNK]
    "no tokenizer": (_no_tokenizer, "it has no tokenizer files (tokenizer.json, vocab.txt, ...)"),
    "nonexistent path": (_missing, "no such file or directory"),
}


@pytest.fixture(params=list(BROKEN), ids=list(BROKEN))
def broken_model(request, tiny_model, tmp_path) -> tuple[Path, str]:
    build, reason = BROKEN[request.param]
    path = tmp_path / "model"
    build(tiny_model, path)
    return path, reason


def assert_names(error: InputError, field: str, path: Path, reason: str) -> None:
    prefix = f"{field}: cannot load {str(path)!r}: "
    assert error.summary.startswith(prefix) and reason in error.summary.removeprefix(prefix), error.summary


def test_the_trainer_names_the_path_and_why(broken_model):
    path, reason = broken_model
    with pytest.raises(InputError) as caught:
        load_tokenizer_and_encoder(str(path))
    assert_names(caught.value, "model.base", path, reason)


def test_mining_and_evaluation_name_the_path_and_why(broken_model):
    path, reason = broken_model
    with pytest.raises(InputError) as caught:
        load_encoder(path, {"pooling": "cls"}, field="model.base")  # as mining loads the base model
    assert_names(caught.value, "model.base", path, reason)
    with pytest.raises(InputError) as caught:
        load_encoder(path)  # as evaluation loads a model
    assert_names(caught.value, "model", path, reason)


def test_a_hub_id_missing_from_the_cache_offline_is_the_users_input(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="model.base: cannot load 'someorg/no-such-model'"):
        load_tokenizer_and_encoder("someorg/no-such-model")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_or_a_full_disk_stays_retryable():
    # as transformers reports a hub it cannot reach: an OSError whose cause is the socket's error
    with pytest.raises(OSError) as caught, loading_model("BAAI/bge-base-en-v1.5"):
        try:
            socket.create_connection(("127.0.0.1", _closed_port()), timeout=5)
        except ConnectionRefusedError as exc:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from exc
    assert not isinstance(caught.value, InputError) and worth_retrying(caught.value)
    with pytest.raises(OSError) as caught, loading_model("BAAI/bge-base-en-v1.5"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not isinstance(caught.value, InputError)


def test_a_causal_lms_unused_head_is_not_reported_but_other_load_problems_are(tiny_decoder, caplog):
    import logging

    from embedtune.trainer.model_loading import _language_model_head_report, load_tokenizer_and_encoder

    with caplog.at_level(logging.WARNING):
        load_tokenizer_and_encoder(str(tiny_decoder), decoder=True)
    assert "LOAD REPORT" not in caplog.text

    def report(*keys: str) -> logging.LogRecord:
        rows = "".join(f"{key} | UNEXPECTED |  | \n" for key in keys)
        message = f"Qwen3Model LOAD REPORT from: x\nKey | Status |  | \n----+--------+--+-\n{rows}"
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, message, None, None)

    assert not _language_model_head_report(report("lm_head.weight"))
    assert _language_model_head_report(report("lm_head.weight", "layers.0.mlp.up_proj.weight"))
