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


def test_config_show_masks_secrets(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from streams.cli import cli

    env = {"PINFRESH_REDIS__PASSWORD": "hunter2-redis", "PINFRESH_MILVUS__TOKEN": "tok-milvus",
           "PINFRESH_KAFKA__SASL_PASSWORD": "kafka-pw", "PINFRESH_STACK__DATA_DIR": str(tmp_path),
           "PINFRESH_LOG_JSON": "true"}
    res = CliRunner().invoke(cli, ["config", "show"], env=env)
    assert res.exit_code == 0, res.output
    for secret in env.values():
        if secret not in (str(tmp_path), "true"):
            assert secret not in res.output
    assert res.output.count("**********") == 3


def test_kafka_security_settings_pass_through():
    from streams.producer import _sasl
    from streams.settings import KafkaSettings

    k = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                      sasl_username="u", sasl_password="s3cr3t-pw")
    kw = _sasl(k)
    assert kw["security_protocol"] == "SASL_PLAINTEXT" and kw["sasl_plain_password"] == "s3cr3t-pw"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-256"
    assert "s3cr3t-pw" not in repr(k)
