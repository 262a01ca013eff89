"""Signals, against the real broker: ``simulate`` and ``replay`` run as subprocesses.

SIGTERM and SIGINT stop both cleanly (final JSON line, exit code 0);
SIGUSR1 pauses a replay and SIGUSR2 resumes it. Readiness is always a
condition polled with a deadline (statuses or messages seen, a log line).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import orjson
import pytest

from simulators import RecordedMessage, RecordingWriter

from .conftest import Collector, json_line, presence, status_filters

STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT]
RECORDED = 30
GAP_S = 0.1


class Command:
    """A ``cityops`` subprocess with its stdout and stderr in files (no pipe can fill up)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self._out_path = tmp_path / f"out-{uuid.uuid4().hex[:6]}"
        self._err_path = tmp_path / f"err-{uuid.uuid4().hex[:6]}"
        self._out: IO[bytes] = self._out_path.open("wb")
        self._err: IO[bytes] = self._err_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cityops.cli", *args], stdout=self._out, stderr=self._err
        )

    @property
    def stderr(self) -> str:
        return self._err_path.read_text(errors="replace")

    def send(self, sig: signal.Signals) -> None:
        assert self.proc.poll() is None, self.stderr[-2000:]
        self.proc.send_signal(sig)

    def wait_stderr(self, text: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.stderr:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                msg = f"{text!r} not in stderr: {self.stderr[-2000:]}"
                raise AssertionError(msg)
            time.sleep(0.02)  # polling a file for a condition, with a deadline

    def finish(self, timeout_s: float = 30.0) -> tuple[int, dict[str, object]]:
        code = self.proc.wait(timeout=timeout_s)
        self.close()
        out = self._out_path.read_text()
        assert out.strip(), self.stderr[-2000:]
        return code, json_line(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._out.close()
        self._err.close()


@pytest.fixture
def command(tmp_path: Path) -> Iterator[Callable[..., Command]]:
    started: list[Command] = []

    def start(*args: str) -> Command:
        cmd = Command(tmp_path, *args)
        started.append(cmd)
        return cmd

    yield start
    for cmd in started:
        cmd.close()


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_simulate_stops_cleanly_on_signal(
    sig: signal.Signals,
    mqtt_url: str,
    city: tuple[Path, tuple[str, str]],
    collect: Callable[..., Collector],
    command: Callable[..., Command],
) -> None:
    path, _ = city
    filters = status_filters(city)
    live = collect(*filters)
    sim = command("simulate", "--mqtt-url", mqtt_url, "--city", str(path), "--seed", "2")
    live.wait_for(lambda ms: len(presence(ms)) == 50, timeout_s=30.0)
    sim.send(sig)
    code, summary = sim.finish()
    assert code == 0, sim.stderr[-2000:]
    assert summary["command"] == "simulate"
    assert summary["ok"] is True
    assert summary["interrupted"] is True
    assert summary["statuses"] == 100  # online, then offline at the clean stop
    assert summary["wills"] == 0
    assert "Traceback" not in sim.stderr
    after = collect(*filters)
    after.wait_for(lambda ms: len(presence(ms, retained_only=True)) == 50)
    assert {state for state, _ in presence(after.messages, retained_only=True).values()} == {
        "offline"
    }


@pytest.fixture
def recording(tmp_path: Path) -> tuple[Path, str]:
    """``RECORDED`` messages ``GAP_S`` apart on topics unique to this test."""
    prefix = f"city/traffic/t{uuid.uuid4().hex[:6]}"
    out = tmp_path / "paced.rec"
    t0 = 1_780_441_200.0
    with RecordingWriter(out, fsync=False) as writer:
        for i in range(RECORDED):
            payload = orjson.dumps({"ts": t0 + i * GAP_S, "occupancy": i / RECORDED})
            writer.append(
                RecordedMessage(t0 + i * GAP_S, f"{prefix}/park-{i:02d}", payload, 1, False, None)
            )
    return out, prefix


def _replay(mqtt_url: str, path: Path, run_id: str) -> list[str]:
    return ["replay", str(path), "--mqtt-url", mqtt_url, "--speed", "1", "--run-id", run_id]


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_replay_stops_cleanly_on_signal(
    sig: signal.Signals,
    mqtt_url: str,
    recording: tuple[Path, str],
    collect: Callable[..., Collector],
    command: Callable[..., Command],
) -> None:
    path, _ = recording
    run_id = f"s-{uuid.uuid4().hex[:8]}"
    sandbox = collect(f"cityops/replay/{run_id}/#")
    replay = command(*_replay(mqtt_url, path, run_id))
    sandbox.wait_for(lambda ms: len(ms) >= 3, timeout_s=20.0)
    replay.send(sig)
    code, summary = replay.finish()
    assert code == 0, replay.stderr[-2000:]
    assert summary["command"] == "replay"
    assert summary["ok"] is True
    assert summary["stopped"] is True
    published = summary["published"]
    assert isinstance(published, int)
    assert 3 <= published < RECORDED
    sandbox.wait_for(lambda ms: len(ms) >= published)
    assert "Traceback" not in replay.stderr


def test_replay_pauses_on_sigusr1_and_resumes_on_sigusr2(
    mqtt_url: str,
    recording: tuple[Path, str],
    collect: Callable[..., Collector],
    command: Callable[..., Command],
) -> None:
    path, _ = recording
    run_id = f"p-{uuid.uuid4().hex[:8]}"
    sandbox = collect(f"cityops/replay/{run_id}/#")
    replay = command(*_replay(mqtt_url, path, run_id))
    sandbox.wait_for(lambda ms: len(ms) >= 5, timeout_s=20.0)
    replay.send(signal.SIGUSR1)
    replay.wait_stderr(f"replay {run_id} paused")
    # Proving an absence takes a bounded wait: at most the message being
    # published when the signal came arrives in the first 0.3 s, then nothing.
    time.sleep(0.3)
    at_pause = len(sandbox.messages)
    time.sleep(1.0)
    assert len(sandbox.messages) == at_pause < RECORDED
    replay.send(signal.SIGUSR2)
    replay.wait_stderr(f"replay {run_id} resumed")
    sandbox.wait_for(lambda ms: len(ms) == RECORDED, timeout_s=20.0)
    code, summary = replay.finish()
    assert code == 0, replay.stderr[-2000:]
    assert summary["published"] == RECORDED
    assert summary["stopped"] is False
    paused_s = summary["paused_s"]
    assert isinstance(paused_s, float)
    # The absence of messages above proves the pause; its duration is the
    # replay's own accounting (not a timing assertion on a loaded machine).
    assert paused_s > 0.0
    topics = [m.topic.rsplit("/", 1)[1] for m in sandbox.messages]
    assert topics == [f"park-{i:02d}" for i in range(RECORDED)]  # each once, in order
