"""The recorder's writer without a proxy: rotation, the total cap, drops when the queue is full."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from shadowproxy.config import RecordConfig
from shadowproxy.record.fileformat import read_paths, recording_files
from shadowproxy.record.recorder import _EXCHANGE, Recorder, RecordWriter, redact
from shadowproxy.shadow.metrics import RecordMetrics
from shadowproxy.shadow.observers import ExchangeRecord


def item(i: int, size: int = 2000) -> tuple[object, ...]:
    body = random.Random(i).randbytes(size).hex().encode()  # barely compressible
    return (_EXCHANGE, f"r{i}", 1.0 + i, "POST", "/p?q=1", 200, [(b"Authorization", b"x")], [], 0.01, False,
            b"{}", body)


def test_files_rotate_and_the_oldest_go_past_the_total_cap(tmp_path: Path) -> None:
    config = RecordConfig(path=str(tmp_path), max_file_bytes=20_000, max_total_bytes=100_000)
    writer = RecordWriter(config, RecordMetrics(CollectorRegistry()))
    for i in range(300):
        writer.records.append(item(i))
        if i % 10 == 9:
            writer._cycle()  # a flush every ten records: one frame each
    writer._close_file()
    files = recording_files([str(tmp_path)])
    sizes = [os.path.getsize(f) for f in files]
    assert len(files) >= 4
    assert sum(sizes) <= 100_000
    assert all(size < 20_000 + 30_000 for size in sizes)  # closed at the first batch past the size
    ids = [r["id"] for r in read_paths([str(tmp_path)])]
    assert ids[-1] == "r299"  # the newest kept, the oldest removed
    assert ids == [f"r{i}" for i in range(300 - len(ids), 300)]


def test_each_worker_keeps_its_share_of_the_total(tmp_path: Path) -> None:
    config = RecordConfig(path=str(tmp_path), max_file_bytes=10_000, max_total_bytes=120_000)
    writer = RecordWriter(config, RecordMetrics(CollectorRegistry()), share=4)
    for i in range(200):
        writer.records.append(item(i))
        writer._cycle()
    writer._close_file()
    assert sum(os.path.getsize(f) for f in recording_files([str(tmp_path)])) <= 30_000


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    from shadowproxy.config import CandidateConfig, Config, ProductionConfig
    from shadowproxy.shadow.metrics import Metrics

    config = Config(production=ProductionConfig(url="http://127.0.0.1:1"),
                    candidate=CandidateConfig(url="http://127.0.0.1:2"), record=RecordConfig(path=str(tmp_path)))
    registry = CollectorRegistry()
    recorder = Recorder(config, Metrics(registry))
    recorder.max_records = 3  # the writer is not started: nothing drains
    for i in range(10):
        recorder.on_exchange(ExchangeRecord(f"r{i}", 0.0, "GET", "/", 200, [], 0.001, False, b"", b""), True)
    assert len(recorder.writer.records) == 3
    assert registry.get_sample_value("shadowproxy_record_dropped_total") == 7


def test_redaction_removes_members_in_every_instance() -> None:
    body = b'{"instances": [{"ssn": 1, "x": 2}, {"ssn": 3, "x": 4}], "token": "t"}'
    from shadowproxy.judging.presets import parse_pointer

    out = redact(body, [parse_pointer("/instances/*/ssn"), parse_pointer("/token")])
    assert out == b'{"instances":[{"x":2},{"x":4}]}'
    assert redact(b"not json", [parse_pointer("/a")]) is None


def test_a_bad_record_key_is_one_line_naming_it() -> None:
    import pytest

    from shadowproxy.config import parse_config
    from shadowproxy.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config({"production": {"url": "http://127.0.0.1:1"}, "candidate": {"url": "http://127.0.0.1:2"},
                      "record": {"sample_rate": 1.5, "max_file_bytes": 10, "redact": ["no-slash"]}})
    problems = info.value.problems
    assert len(problems) == 3
    assert [p.split(":")[0] for p in problems] == ["record.sample_rate", "record.max_file_bytes", "record.redact[0]"]


def test_replay_refuses_bad_pacing_with_usage_exit(capsys: object) -> None:
    from shadowproxy.commands.cli import main

    assert main(["replay", "nowhere", "--candidate", "http://127.0.0.1:9", "--rate", "0"]) == 2
    assert main(["replay", "nowhere", "--candidate", "http://127.0.0.1:9", "--rate", "5", "--max"]) == 2


def test_check_config_names_the_recording_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shadowproxy.commands.cli import main

    config = tmp_path / "c.toml"
    config.write_text('[production]\nurl = "http://127.0.0.1:9001"\n[candidate]\nurl = "http://127.0.0.1:9002"\n'
                      f'[record]\npath = "{tmp_path / "rec"}"\nsample_rate = 0.5\n')
    assert main(["check-config", str(config)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("record")]
    assert line == [f"  record      {tmp_path / 'rec'} (sample_rate 0.5; see `shadowproxy replay`)"]


def test_under_workers_each_recorder_keeps_its_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shadowproxy.config import CandidateConfig, Config, ProductionConfig
    from shadowproxy.record.recorder import WORKERS_ENV
    from shadowproxy.shadow.metrics import Metrics

    monkeypatch.setenv(WORKERS_ENV, "4")  # as `serve --workers 4` sets it for each worker
    config = Config(production=ProductionConfig(url="http://127.0.0.1:1"),
                    candidate=CandidateConfig(url="http://127.0.0.1:2"),
                    record=RecordConfig(path=str(tmp_path), max_total_bytes=400_000))
    assert Recorder(config, Metrics(CollectorRegistry())).writer.total_cap == 100_000
