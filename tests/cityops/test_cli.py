"""Command-line errors are clear and exit non-zero, without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityops.cli import main


def test_ingest_with_a_broken_rules_file_names_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - id: x\n    when: value <\n")
    monkeypatch.setenv("CITYOPS_MQTT_URL", "mqtt://127.0.0.1:1")
    monkeypatch.setenv("CITYOPS_DATABASE_URL", "postgresql://127.0.0.1:1/none")
    assert main(["ingest", "--rules", str(bad), "--no-metrics"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err
    assert "Traceback" not in err


def test_ingest_without_services_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CITYOPS_MQTT_URL", raising=False)
    monkeypatch.delenv("CITYOPS_DATABASE_URL", raising=False)
    monkeypatch.setenv("CITYOPS_DATA_DIR", str(tmp_path / "nothing-here"))
    assert main(["ingest", "--no-metrics"]) == 2
    assert "CITYOPS_MQTT_URL is not set" in capsys.readouterr().err


def test_bad_mqtt_url_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CITYOPS_MQTT_URL", "http://example")
    assert main(["ingest", "--no-metrics"]) == 2
    assert "scheme must be mqtt:// or mqtts://" in capsys.readouterr().err


def test_db_migrate_reports_an_unreachable_database(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CITYOPS_MQTT_URL", "mqtt://127.0.0.1:1")
    monkeypatch.setenv("CITYOPS_DATABASE_URL", "postgresql://127.0.0.1:1/none?connect_timeout=2")
    assert main(["db", "migrate"]) == 1
    assert "cityops db migrate:" in capsys.readouterr().err


def test_rules_validate_accepts_the_shipped_rules_and_names_a_bad_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cityops.runtime import DEFAULT_RULES  # noqa: PLC0415

    assert main(["rules", "validate", str(DEFAULT_RULES)]) == 0
    assert "rules OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - id: x\n    name: X\n    severity: loud\n")
    assert main(["rules", "validate", str(bad)]) == 2
    assert f"{bad}:" in capsys.readouterr().err


def test_a_shared_group_member_does_not_evaluate_rules_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cityops.cli import build_parser  # noqa: PLC0415
    from cityops.settings import Settings  # noqa: PLC0415
    from ingest.cli import _rules_for  # noqa: PLC0415

    settings = Settings.from_env({})
    parser = build_parser()
    shared = parser.parse_args(["ingest", "--shared-group", "g1"])
    assert _rules_for(shared, settings) is None
    explicit = parser.parse_args(["ingest", "--shared-group", "g1", "--rules", "/r"])
    assert str(_rules_for(explicit, settings)) == "/r"
    alone = parser.parse_args(["ingest"])
    assert _rules_for(alone, settings) is not None
    assert _rules_for(parser.parse_args(["ingest", "--no-rules"]), settings) is None
