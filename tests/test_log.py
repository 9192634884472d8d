"""Logging: levels, and a worker's records relayed through the driver as plain `[efficientllava]` lines."""

from __future__ import annotations

import logging

import pytest

from efficientllava.log import configure, current_level, drain, get_logger, replay


@pytest.fixture(autouse=True)
def restore_logging():
    """Put the package's logger back as it was (these tests reconfigure it)."""
    root = logging.getLogger("efficientllava")
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_relay_keeps_records_off_stderr_until_replayed(capsys):
    configure(logging.INFO, relay=True)  # as a Ray worker below --verbose
    log = get_logger("efficientllava.problem.session")
    log.info("round 0: variant bank abc ready")
    log.debug("not at INFO")
    log.warning("careful")
    assert capsys.readouterr().err == ""  # nothing reaches the worker's stderr (Ray's prefixed copy)
    records = drain()
    assert records == [(logging.INFO, "round 0: variant bank abc ready"), (logging.WARNING, "careful")]
    assert drain() == []  # drained once

    configure(logging.INFO)  # as the driver
    replay(records)
    assert capsys.readouterr().err.splitlines() == ["[efficientllava] round 0: variant bank abc ready",
                                                    "[efficientllava] careful"]


def test_replay_follows_the_driver_level(capsys):
    configure(logging.WARNING)  # --quiet
    replay([(logging.INFO, "progress"), (logging.ERROR, "broken")])
    assert capsys.readouterr().err.splitlines() == ["[efficientllava] broken"]
    assert current_level() == logging.WARNING


def test_drain_without_relay_is_empty():
    configure(logging.INFO)
    get_logger(__name__).info("to stderr")
    assert drain() == []


def test_switching_modes_keeps_one_handler():
    configure(logging.INFO, relay=True)
    configure(logging.INFO)
    configure(logging.INFO)
    ours = [h for h in logging.getLogger("efficientllava").handlers if type(h).__module__ == "efficientllava.log"]
    assert len(ours) == 1
