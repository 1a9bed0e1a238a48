"""A coordinator that never answers (issue 14): a member's wait for its reply is bounded by
``exchange.timeout_s`` plus a margin, through Ray calls as over the direct connection
(tests/test_channel.py), and a real run whose coordinator is stuck fails naming the member and
the wait instead of hanging."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager

import pytest

import poptrain
from poptrain.exchange.channel import CoordinatorClient, ReplyTimeout, reply_bound


@contextmanager
def at_most(seconds: int):
    """Fail the test instead of hanging it: SIGALRM interrupts the driver's polling loop, and the
    run's own cleanup then kills its actors."""

    def hung(signum, frame):
        raise TimeoutError(f"still waiting after {seconds} s: the run hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_through_ray_calls_a_coordinator_that_never_answers_is_a_timeout(ray_session, monkeypatch):
    import ray

    import poptrain.exchange.channel as channel

    monkeypatch.setattr(channel, "REPLY_MARGIN_S", 0.0)
    monkeypatch.setattr(channel, "REPLY_MARGIN_FRACTION", 0.0)

    @ray.remote(num_cpus=0, max_concurrency=2)
    class Stuck:
        def exchange(self, kind, step, member, wire):
            time.sleep(60)

        def ping(self):
            return True

    actor = Stuck.remote()
    try:
        ray.get(actor.ping.remote(), timeout=60)  # started: the bound below is the call's alone
        client = CoordinatorClient(actor, None, timeout_s=1.0)
        reply = client.call("exchange", "grad", 4, "m2", ())
        started = time.monotonic()
        with pytest.raises(ReplyTimeout, match=r"exchange of 'grad' at step 4: member 'm2' waited 1 s .*\(through a Ray call\).*did not answer"):
            reply()
        assert 0.95 < time.monotonic() - started < 5
    finally:
        ray.kill(actor, no_restart=True)


def test_a_run_whose_coordinator_is_stuck_fails_naming_the_member_and_the_wait(ray_session, base_config):
    timeout_s = 3.0
    coupling = {"type": "tests.helpers:SeparationThatHangsTheCoordinator", "param": "activation.weight", "margin": 2.0, "hang_at_exchange": 3}
    config = base_config(steps=30, exchange={"timeout_s": timeout_s}, couplings=[coupling])
    started = time.monotonic()
    with (
        at_most(150),
        pytest.raises(
            poptrain.PopulationError,
            match=rf"member m[12] failed: ReplyTimeout: exchange of 'param' at step 3: member 'm[12]' waited {reply_bound(timeout_s):g} s "
            r"for the coordinator's reply \(over the direct connection\) and the coordinator did not answer",
        ),
    ):
        poptrain.run(config)
    assert time.monotonic() - started < 120, "the coordinator's thread hangs for 120 s: the run did not wait for it"
