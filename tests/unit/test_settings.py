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
    from streams.kafka import aiokafka_kwargs, faust_kwargs
    from streams.settings import KafkaSettings

    k = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                      sasl_username="u", sasl_password="s3cr3t-pw")
    kw = aiokafka_kwargs(k)
    assert kw["security_protocol"] == "SASL_PLAINTEXT" and kw["sasl_plain_password"] == "s3cr3t-pw"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-256"
    assert "s3cr3t-pw" not in repr(k)
    creds = faust_kwargs(k)["broker_credentials"]
    assert creds.password == "s3cr3t-pw" and creds.username == "u"


def _every_field_changed() -> Settings:
    """Settings with a non-default value in every field that has a non-None default."""
    from pathlib import Path

    from pydantic import SecretStr

    s = Settings()
    update = {}
    for section, sub in s:
        if not hasattr(sub, "model_fields"):
            continue
        changes = {}
        for name, info in type(sub).model_fields.items():
            v = getattr(sub, name)
            ann = str(info.annotation)
            if isinstance(v, bool):
                changes[name] = not v
            elif isinstance(v, int):
                changes[name] = v + 1 if not (info.metadata and any(
                    getattr(m, "le", None) == v for m in info.metadata)) else v - 1
            elif isinstance(v, float):
                changes[name] = v * 1.5 if v else 0.5
            elif isinstance(v, Path):
                changes[name] = v / "x"
            elif isinstance(v, list):
                changes[name] = ["a.example", "b.example"]
            elif isinstance(v, dict):
                changes[name] = {"a": 1, "b": 0.5, "c": "x"}
            elif v is None and "int" in ann:
                changes[name] = 7
            elif v is None and "Path" in ann:
                changes[name] = Path("/tmp/pf") / name
            elif v is None and "SecretStr" in ann:
                changes[name] = SecretStr(f"secret-{name}")
            elif v is None:
                changes[name] = f"value-{name}"
            elif isinstance(v, str) and "Literal" not in ann:
                changes[name] = v if name in ("log_level",) else (
                    v + "_X" if v.isupper() else v + "_x")
        update[section] = sub.model_copy(update=changes)
    return s.model_copy(update=update)


def test_every_setting_travels_to_a_child_process(monkeypatch):
    from streams.settings import env_names

    original = _every_field_changed()
    env = original.to_env()
    assert sorted(env) == sorted(env_names())  # every field, none forgotten
    for k in [k for k in __import__("os").environ if k.startswith("PINFRESH_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rebuilt = Settings(_env_file=None)
    assert rebuilt.model_dump(mode="json", exclude={"redis", "milvus", "kafka"}) == \
        original.model_dump(mode="json", exclude={"redis", "milvus", "kafka"})
    for section in ("redis", "milvus", "kafka"):  # these hold secrets: compare them unmasked
        a, b = getattr(rebuilt, section), getattr(original, section)
        for name in type(a).model_fields:
            va, vb = getattr(a, name), getattr(b, name)
            if hasattr(va, "get_secret_value"):
                va, vb = va.get_secret_value(), vb.get_secret_value()
            assert va == vb, (section, name)
    assert "secret-token" in env.values()  # MILVUS__TOKEN went through the environment


def test_unknown_variable_is_named_with_the_closest_setting():
    from streams.settings import unknown_env

    got = unknown_env(["PINFRESH_WORKER__BATCHSIZE", "PINFRESH_WORKER__BATCH_SIZE",
                       "PINFRESH_KAFKA", "PINFRESH_QQQ", "HOME"])
    assert got == [("PINFRESH_QQQ", None),
                   ("PINFRESH_WORKER__BATCHSIZE", "PINFRESH_WORKER__BATCH_SIZE")]


def test_cli_warns_about_a_typo_and_refuses_a_bad_value_in_one_line(tmp_path):
    import subprocess
    import sys

    base = {"PATH": "/usr/bin:/bin", "PINFRESH_STACK__DATA_DIR": str(tmp_path)}
    typo = subprocess.run([sys.executable, "-m", "streams.cli", "config", "show"],
                          env={**base, "PINFRESH_WORKER__BATCHSIZE": "64"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert typo.returncode == 0
    assert "PINFRESH_WORKER__BATCHSIZE" in typo.stderr
    assert "did you mean PINFRESH_WORKER__BATCH_SIZE" in typo.stderr
    bad = subprocess.run([sys.executable, "-m", "streams.cli", "config", "show"],
                         env={**base, "PINFRESH_WORKER__BATCH_SIZE": "abc"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "PINFRESH_WORKER__BATCH_SIZE='abc'" in lines[0]
    assert "integer" in lines[0]


def test_dotenv_address_beats_a_recorded_embedded_stack(tmp_path, monkeypatch):
    import json as _json

    from streams.runtime.processes import load_settings

    data = tmp_path / "data"
    data.mkdir()
    svc = {"pid": 1, "port": 1, "log": ""}
    (data / "stack.json").write_text(_json.dumps({
        "host": "127.0.0.1", "kafka": {**svc, "name": "kafka", "port": 19999},
        "redis": {**svc, "name": "redis", "port": 16999},
        "milvus": {**svc, "name": "milvus", "port": 19599}}))
    (tmp_path / ".env").write_text("PINFRESH_REDIS__URL=redis://db:6379/0\n")
    for k in [k for k in __import__("os").environ if k.startswith("PINFRESH_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PINFRESH_STACK__DATA_DIR", str(data))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("streams.runtime.stack._pid_alive", lambda pid: True)
    s = load_settings()
    assert s.redis.url == "redis://db:6379/0"  # .env wins over the stack file
    assert s.kafka.bootstrap_servers == "127.0.0.1:19999"  # unset: the stack's address


def test_broker_outage_flood_becomes_one_warning_per_interval():
    import logging as _logging

    from streams.runtime.logconf import RateLimitFilter

    now = [0.0]
    f = RateLimitFilter(interval_s=60, clock=lambda: now[0])

    def rec(name: str, msg: str, level: int = _logging.ERROR) -> _logging.LogRecord:
        return _logging.LogRecord(name, level, __file__, 1, msg, (), None)

    flood = [rec("aiokafka", "Unable connect to node with id 1: [Errno 111] Connect call failed"),
             rec("aiokafka.consumer.fetcher", "Failed fetch messages from 1: NodeNotReadyError"),
             rec("aiokafka", "Unable to update metadata from [1]")] * 400
    passed = [r for r in flood if f.filter(r)]
    assert len(passed) == 1 and passed[0].levelname == "WARNING"
    assert passed[0].getMessage().startswith("Kafka broker unreachable: Unable connect")
    now[0] = 61.0
    later = rec("aiokafka", "Unable to update metadata from [1]")
    assert f.filter(later) and "1199 similar line(s) suppressed" in later.getMessage()
    # a one-shot command logs this and exits: the line promises no retry
    assert "retrying" not in later.getMessage()
    assert f.filter(rec("streams.app", "our own error"))  # never limited
    assert f.filter(rec("aiokafka", "a debug line", _logging.INFO))


def test_child_environ_drops_the_parents_pinfresh_variables():
    s = Settings(_env_file=None).model_copy(update={"encoder": Settings().encoder.model_copy(
        update={"model": "null"})})
    env = s.child_environ({"PATH": "/bin", "PINFRESH_ENCODER__CHECKPOINT": "/old",
                           "pinfresh_worker__batch_size": "7"})
    assert env["PATH"] == "/bin" and env["PINFRESH_ENCODER__MODEL"] == "null"
    assert "PINFRESH_ENCODER__CHECKPOINT" not in env  # None here: not inherited either
    assert "pinfresh_worker__batch_size" not in env
    assert env["PINFRESH_WORKER__BATCH_SIZE"] == str(s.worker.batch_size)


def test_milvus_clients_get_a_dedicated_channel_that_pings_only_during_calls(monkeypatch):
    """pymilvus shares one channel per address and pings every 10 s while idle; a gRPC
    server that enforces a ping policy answers GOAWAY "too many pings" and the next client
    on that address failed to connect (seen in CI on Milvus Lite). `connect` gives each
    client its own channel that pings only during calls."""
    import store.milvus as sm

    seen = {}

    class Client:
        def __init__(self, **kw):
            seen.update(kw)

    monkeypatch.setattr(sm, "MilvusClient", Client)
    sm.connect("http://127.0.0.1:1", keepalive_s=300)
    assert seen["dedicated"] is True
    assert seen["grpc_options"] == {"grpc.keepalive_time_ms": 300_000,
                                    "grpc.keepalive_permit_without_calls": False}


def test_a_field_without_its_section_is_pointed_at_the_real_name():
    from streams.settings import unknown_env

    assert unknown_env(["PINFRESH_DATA_DIR"]) == [("PINFRESH_DATA_DIR",
                                                   "PINFRESH_STACK__DATA_DIR")]


def test_a_list_or_object_setting_that_is_not_json_is_one_line(tmp_path):
    """pydantic-settings names only the section ("fetch") in a 70-line traceback."""
    import subprocess
    import sys

    base = {"PATH": "/usr/bin:/bin", "PINFRESH_STACK__DATA_DIR": str(tmp_path)}
    for name, value, example in [
            ("PINFRESH_FETCH__ALLOWED_HOSTS", "127.0.0.1", '["a.example", "b.example"]'),
            ("PINFRESH_MILVUS__INDEX_PARAMS", "{M:16}", '{"M": 16}')]:
        bad = subprocess.run([sys.executable, "-m", "streams.cli", "config", "show"],
                             env={**base, name: value}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stdout == ""
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1, bad.stderr
        assert f"{name}={value!r}: expected JSON" in lines[0] and example in lines[0]


def test_without_a_running_stack_clients_follow_the_configured_stack_ports(tmp_path,
                                                                         monkeypatch):
    """With PINFRESH_STACK__*_PORT set and no stack.json, clients used the default ports
    and could join someone else's stack."""
    from streams.runtime.processes import load_settings

    for k in [k for k in __import__("os").environ if k.startswith("PINFRESH_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PINFRESH_STACK__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PINFRESH_STACK__KAFKA_PORT", "29092")
    monkeypatch.setenv("PINFRESH_STACK__REDIS_PORT", "26379")
    monkeypatch.setenv("PINFRESH_STACK__MILVUS_PORT", "0")  # a free port: nothing to follow
    monkeypatch.setenv("PINFRESH_MILVUS__URI", "http://m:1")
    s = load_settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:29092"
    assert s.redis.url == "redis://127.0.0.1:26379/0"
    assert s.milvus.uri == "http://m:1"  # set explicitly: kept


def test_a_field_name_several_sections_have_lists_every_candidate():
    from streams.settings import unknown_env

    (name, hint), = unknown_env(["PINFRESH_TIMEOUT_S"])
    assert hint is not None and "PINFRESH_MILVUS__TIMEOUT_S" in hint and " or " in hint


def test_a_failed_first_start_leaves_no_engine_marker(tmp_path, monkeypatch):
    """Without network namespaces `up` fails and advises PINFRESH_STACK__MILVUS=lite;
    following the advice must work: the engine is recorded only once it has started."""
    import pytest as _pytest

    from encoder.errors import StackError
    from streams.runtime import services
    from streams.runtime.stack import EmbeddedStack
    from streams.runtime.stackstate import ServiceInfo
    from streams.settings import StackSettings

    def fake_spawn(data_dir, name, cmd, port, bus_port=0, pass_fds=()):
        return ServiceInfo(name=name, pid=0, port=port, log="")

    def no_namespaces(data_dir, host, port):
        raise StackError("user namespaces are off: ... or set PINFRESH_STACK__MILVUS=lite")

    monkeypatch.setattr(services, "spawn", fake_spawn)
    monkeypatch.setattr(services, "kafka_cmd", lambda *a: ["kafka"])
    monkeypatch.setattr(services, "redis_cmd", lambda *a: ["redis"])
    monkeypatch.setattr(services, "spawn_milvus_server", no_namespaces)
    st = EmbeddedStack(StackSettings(data_dir=tmp_path, kafka_port=0, redis_port=0,
                                     milvus_port=0, supervise=False))
    with _pytest.raises(StackError, match="MILVUS=lite"):
        st.start()
    assert not (tmp_path / "milvus" / "ENGINE").exists() and st.read() is None
    assert services.milvus_engine(tmp_path, "lite") == "lite"  # the advice is not refused
