"""Node configuration: defaults, validation errors that name the key, CLI overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_ai.cli import main
from dicom_ai.node.config import ConfigError, NodeConfig, load_config, parse_remote

GOOD = """
[node]
ae_title = "AINODE"
port = 11113
storage = "store"

[[peers]]
ae_title = "PACS"
host = "10.0.0.5"
port = 104

[[destinations]]
ae_title = "ARCHIVE"
host = "archive.example.org"
port = 4242

[study]
idle_seconds = 60

[retry]
max_attempts = 3
initial_delay_seconds = 2
"""


def _write(tmp_path, text):
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg.node.ae_title == "DICOM_AI"
    assert cfg.node.port == 11112
    assert cfg.node.allow_any_caller is False
    assert cfg.pipeline.models == ["glam", "dunet", "microcalc"]
    assert cfg.pipeline.device == "auto"
    assert cfg.peers == [] and cfg.destinations == []


def test_file_is_read_and_storage_is_relative_to_it(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.node.ae_title == "AINODE" and cfg.node.port == 11113
    assert cfg.storage_dir == (tmp_path / "store").resolve()
    assert str(cfg.peer("PACS")) == "PACS@10.0.0.5:104"
    assert cfg.peer("NOBODY") is None
    assert [d.ae_title for d in cfg.destinations] == ["ARCHIVE"]
    assert cfg.study.idle_seconds == 60.0 and cfg.study.grace_seconds == 10.0
    assert cfg.retry.max_attempts == 3


def test_retry_delays_back_off_exponentially_up_to_the_cap():
    cfg = load_config(None, {"retry.initial_delay_seconds": 1.0, "retry.max_delay_seconds": 5.0})
    assert [cfg.retry.delay(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


@pytest.mark.parametrize("text, key", [
    ("[node]\nae_titel = 'X'\n", "node.ae_titel"),
    ("[nodes]\nport = 1\n", "nodes"),
    ("[study]\nidle = 5\n", "study.idle"),
    ("[[peers]]\nae_title = 'P'\nhost = 'h'\nport = 104\nfoo = 1\n", "peers[0].foo"),
])
def test_unknown_key_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"unknown .*{key.replace('[', '.').replace(']', '.')}"):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ("[node]\nport = 70000\n", "node.port"),
    ("[node]\nport = 'eleven'\n", "node.port"),
    ("[node]\nport = -1\n", "node.port"),
    ("[[peers]]\nae_title = 'P'\nhost = 'h'\nport = 0\n", "peers[0].port"),
    ("[[destinations]]\nae_title = 'D'\nhost = 'h'\nport = 65536\n", "destinations[0].port"),
])
def test_bad_port_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    assert key in str(err.value) and "port" in str(err.value)


def test_duplicate_ae_title_is_named(tmp_path):
    text = GOOD + "\n[[peers]]\nae_title = 'ARCHIVE'\nhost = 'x'\nport = 1\n"
    with pytest.raises(ConfigError, match=r"duplicate AE title 'ARCHIVE': destinations\[0\].ae_title repeats "
                                          r"peers\[1\].ae_title"):
        load_config(_write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"peers\[0\].ae_title repeats node.ae_title"):
        load_config(None, {"node.ae_title": "PACS", "peers": ["PACS@h:1"]})


@pytest.mark.parametrize("text, fragment", [
    ("[node]\nae_title = 'THIS-IS-LONGER-THAN-16'\n", "node.ae_title"),
    ("[node]\nae_title = 'A\\\\B'\n", "node.ae_title"),
    ("[node]\nallow_any_caller = 'yes'\n", "node.allow_any_caller"),
    ("[pipeline]\ndevice = 'gpu'\n", "pipeline.device"),
    ("[pipeline]\nmodels = []\n", "pipeline.models"),
    ("[retry]\nmax_attempts = 0\n", "retry.max_attempts"),
    ("[logging]\nlevel = 'LOUD'\n", "logging.level"),
    ("[results]\nsegmentation_type = 'LABELMAP'\n", "results.segmentation_type"),
    ("[results]\ncompression = 'rle'\n", "results.compression"),
    ("[node\n", "not valid TOML"),
])
def test_other_bad_values_are_named(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(_write(tmp_path, text))


def test_flags_override_the_file(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), {
        "node.ae_title": "FLAGNODE", "node.port": 20000, "node.storage": str(tmp_path / "other"),
        "peers": ["PACS@127.0.0.1:2104", "MODALITY@127.0.0.1:3104"], "node.allow_any_caller": True,
        "pipeline.device": "cpu", "node.bind_address": None})
    assert cfg.node.ae_title == "FLAGNODE" and cfg.node.port == 20000
    assert cfg.storage_dir == (tmp_path / "other").resolve()
    assert [str(p) for p in cfg.peers] == ["PACS@127.0.0.1:2104", "MODALITY@127.0.0.1:3104"]
    assert cfg.node.allow_any_caller is True and cfg.pipeline.device == "cpu"
    assert cfg.node.bind_address == "127.0.0.1"  # None = flag not given


@pytest.mark.parametrize("text", ["PACS@host", "PACS:104", "@h:1", "PACS@h:port", "PACS@h:99999"])
def test_peer_flag_syntax(text):
    with pytest.raises(ConfigError, match="peer"):
        parse_remote(text)


def test_json_round_trip_for_the_worker(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    again = NodeConfig.from_json(cfg.to_json())
    assert again == cfg


def test_serve_refuses_a_bad_file_before_starting(tmp_path, capsys):
    bad = _write(tmp_path, "[node]\nport = 123456\n")
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--config", str(bad)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "node.port" in err
    assert not (tmp_path / "dicom-ai-storage").exists()


def test_serve_refuses_to_start_when_nobody_could_send(tmp_path, capsys):
    assert main(["serve", "--storage", str(tmp_path / "st"), "--port", "0"]) == 2
    assert "no [[peers]]" in capsys.readouterr().err


def test_storage_defaults_to_systemds_state_directory_when_the_file_names_none(tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/dicom-ai")
    cfg = load_config(_write(tmp_path, '[node]\nae_title = "AINODE"\n'))
    assert cfg.storage_dir == Path("/var/lib/dicom-ai")  # not <cwd>/dicom-ai-storage under systemd
    named = load_config(_write(tmp_path, '[node]\nstorage = "/mnt/shared"\n'))
    assert named.storage_dir == Path("/mnt/shared")  # what the file says wins
    monkeypatch.delenv("STATE_DIRECTORY")
    assert load_config(_write(tmp_path, "[node]\n")).node.storage == "dicom-ai-storage"
