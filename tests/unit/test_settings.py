"""The settings object: env nesting and secret masking."""

from __future__ import annotations

import logging

from streams.settings import Settings


def test_env_nesting(monkeypatch):
    monkeypatch.setenv("PINFRESH_KAFKA__BOOTSTRAP_SERVERS", "b1:9092,b2:9092")
    monkeypatch.setenv("PINFRESH_WORKER__BATCH_SIZE", "7")
    monkeypatch.setenv("PINFRESH_ENCODER__CHECKPOINT", "/models/v3")
    s = Settings()
    assert s.kafka.bootstrap_servers == "b1:9092,b2:9092"
    assert s.worker.batch_size == 7
    assert str(s.encoder.checkpoint) == "/models/v3"


def test_secrets_masked(monkeypatch, caplog):
    monkeypatch.setenv("PINFRESH_REDIS__PASSWORD", "hunter2")
    monkeypatch.setenv("PINFRESH_MILVUS__TOKEN", "root:sekrit")
    s = Settings()
    assert s.redis.password is not None and s.redis.password.get_secret_value() == "hunter2"
    dumped = str(s.masked()) + repr(s) + str(s)
    assert "hunter2" not in dumped and "sekrit" not in dumped
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("settings %s", s)
    assert "hunter2" not in caplog.text


def test_defaults_bind_loopback():
    s = Settings()
    assert s.stack.host == "127.0.0.1"
    assert s.worker.metrics_host == "127.0.0.1"
    assert s.fetch.allow_private_networks is False
