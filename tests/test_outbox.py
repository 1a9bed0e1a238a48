"""The metrics outbox: a member drops a metric only once the driver says everything it took is
written, so neither a lost reply nor a crash of the driver loses one. And the driver's writer:
how often it writes."""

from __future__ import annotations

from poptrain.tracking.outbox import MetricsOutbox
from poptrain.tracking.runs import MAX_WRITE_EVERY_S, WRITE_EVERY_S, WRITER_CPU_SHARE, write_interval


def items(*steps):
    return [("loss", float(s), s, 0) for s in steps]


def test_taken_metrics_are_kept_until_the_driver_says_they_are_written():
    outbox = MetricsOutbox()
    outbox.add(items(0, 1))
    assert outbox.take(written=False) == items(0, 1)
    outbox.add(items(2))
    assert outbox.unwritten() == items(0, 1, 2), "what a checkpoint keeps"
    assert outbox.take(written=False) == items(2), "not yet written: kept, not sent twice"
    assert outbox.unwritten() == items(0, 1, 2)
    outbox.add(items(3))
    assert outbox.take(written=True) == items(3)
    assert outbox.unwritten() == items(3)


def test_a_lost_reply_is_sent_again():
    outbox = MetricsOutbox(items(0))  # restored from a checkpoint
    assert outbox.take(written=True) == items(0)  # this reply never reaches the driver
    outbox.add(items(1))
    assert outbox.take(written=True, resend=True) == items(0, 1)
    assert outbox.unwritten() == items(0, 1)


def test_the_writer_writes_every_second_unless_writing_would_take_more_than_its_share_of_a_core():
    assert write_interval(0.0) == WRITE_EVERY_S == 1.0
    assert write_interval(0.01) == 1.0, "a small population: every second"
    # A large population's pass (one log_batch per run) that took 0.2 s of CPU waits 4 s: 5 % of a core.
    assert write_interval(0.2) == 0.2 / WRITER_CPU_SHARE == 4.0
    assert write_interval(60.0) == MAX_WRITE_EVERY_S == 30.0, "metrics still reach MLflow every 30 s at most"
