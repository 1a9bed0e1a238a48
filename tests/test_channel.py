"""The direct connection between members and the coordinator (poptrain.exchange.channel), without Ray:
only a holder of the run's key is served, it listens where it is told, replies find their
request, a coordinator's error reaches the member as itself, and a coordinator that never
answers is a timeout, not a hang."""

from __future__ import annotations

import socket
import threading
import time
from multiprocessing.connection import AuthenticationError, Client

import pytest

from poptrain.exchange.channel import ChannelServer, CoordinatorClient, ReplyTimeout, reply_bound
from poptrain.exchange.wire import ExchangeTimeout, Wire


@pytest.fixture
def served():
    """A server on loopback whose ``hold`` handler blocks until released, and what it was called with."""
    calls, release = [], threading.Event()

    def echo(*args):
        calls.append(args)
        return args

    def hold(value):
        release.wait(10)
        return value

    def fail(message):
        raise ExchangeTimeout(message)

    server = ChannelServer({"echo": echo, "hold": hold, "fail": fail}, host="127.0.0.1", inline=False, threads=4)
    yield server, calls, release
    release.set()
    server.close()


def test_values_cross_with_their_shapes_and_dtypes():
    """A loss stays 0-d, a float64 parameter stays float64, large payloads travel as arrays."""
    import numpy as np

    from poptrain.couplings import Quantity

    loss, weight, big = Quantity("m1", "loss", "loss"), Quantity("m1", "param", "w"), Quantity("m2", "param", "big")

    class Plan:
        sends = {"m1": {"loss": [loss], "param": [weight]}, "m2": {"param": [big]}}
        replaced = {"m1": set(), "m2": set()}

    wire = Wire(Plan())
    small = {loss: np.array(0.5, np.float32), weight: np.arange(6, dtype=np.float64).reshape(2, 3)}
    back = wire.unpack(wire.pack(small))
    assert {q: (a.shape, a.dtype, a.tolist()) for q, a in back.items()} == {q: (a.shape, a.dtype, a.tolist()) for q, a in small.items()}
    large = {big: np.ones((300, 300), np.float32)}
    packed = wire.pack(large)
    assert isinstance(packed[1], list), "as arrays, which Ray passes out of band"
    assert wire.unpack(packed)[big].shape == (300, 300) and wire.pack({}) == () and wire.unpack(()) == {}


def test_a_family_of_many_members_values_crosses_as_one_column():
    """A host's 1,000 members' slopes are one array on the wire, not 1,000: row i member i's, each
    member's value read back as it was sent; a family sent in two shapes offers no one column."""
    import numpy as np

    from poptrain.couplings import Quantity

    names = [f"m{i}" for i in range(1000)]

    class Plan:
        sends = {m: {"loss": [Quantity(m, "loss", "loss")], "param": [Quantity(m, "param", "slope")]} for m in names}
        replaced = {m: set() for m in names}

    wire = Wire(Plan())
    slopes = {Quantity(m, "param", "slope"): np.full(40, i, np.float32) for i, m in enumerate(reversed(names))}
    losses = {Quantity(m, "loss", "loss"): np.array(i / 2, np.float32) for i, m in enumerate(names)}
    packed = wire.pack({**slopes, **losses})
    assert isinstance(packed[1], list) and [a.shape for a in packed[1]] == [(1000, 40), (1000,)], "one column per family"
    values, columns = wire.unpack_columns(packed)
    assert {q: (a.shape, a.tolist()) for q, a in values.items()} == {q: (a.shape, a.tolist()) for q, a in {**slopes, **losses}.items()}
    members, column = columns[("param", "slope")]
    assert members == tuple(reversed(names)) and column[0].tolist() == [0.0] * 40, "rows in the order sent"
    mixed = wire.unpack_columns(
        wire.pack({Quantity("m0", "param", "slope"): np.zeros(40, np.float32), Quantity("m1", "param", "slope"): np.zeros(3, np.float32)})
    )
    assert ("param", "slope") not in mixed[1] and mixed[0][Quantity("m1", "param", "slope")].shape == (3,)


def test_it_listens_only_on_the_address_it_is_given(served):
    server, _, _ = served
    assert server.address[0] == "127.0.0.1"
    with pytest.raises(OSError):  # not on this machine's other addresses
        socket.create_connection((_other_address(), server.address[1]), timeout=1).close()


def test_a_client_without_the_runs_key_is_refused_before_any_message_is_read(served):
    server, calls, _ = served
    with pytest.raises(AuthenticationError):
        Client(server.address, family="AF_INET", authkey=b"x" * 32)
    raw = socket.create_connection(server.address)  # no handshake at all: it is never served
    raw.sendall(b"\x00\x00\x00\x05hello")
    raw.close()
    client = CoordinatorClient(None, (server.address, server.authkey))
    assert client.call("echo", 1, "m1")() == (1, "m1")
    assert calls == [(1, "m1")], "only the authenticated client's request reached a handler"
    client.close()


def test_replies_find_their_request_when_they_complete_out_of_order(served):
    server, _, release = served
    client = CoordinatorClient(None, (server.address, server.authkey))
    held = client.call("hold", "first")
    quick = client.call("echo", "second")
    assert quick() == ("second",), "the later request completes first"
    release.set()
    assert held() == "first"
    client.close()


def test_a_coordinator_error_reaches_the_member_as_itself(served):
    server, _, _ = served
    client = CoordinatorClient(None, (server.address, server.authkey))
    with pytest.raises(ExchangeTimeout, match="waited 1 s for"):
        client.call("fail", "member 'm1' waited 1 s for ['m2']")()
    client.close()


def test_a_lost_coordinator_is_an_error_not_a_hang(served):
    server, _, _ = served
    client = CoordinatorClient(None, (server.address, server.authkey))
    reply = client.call("hold", "never")
    with socket.fromfd(client.conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as same:
        same.shutdown(socket.SHUT_RDWR)  # the connection is cut under the waiting member
    with pytest.raises(ConnectionError, match="lost the connection to the coordinator"):
        reply()


def test_a_client_that_never_answers_the_challenge_is_dropped(served, monkeypatch):
    import poptrain.exchange.channel as channel

    server, _, _ = served
    monkeypatch.setattr(channel, "HANDSHAKE_TIMEOUT_S", 0.3)
    silent = socket.create_connection(server.address)  # connects, then says nothing
    silent.settimeout(5)
    silent.recv(1024)  # the challenge
    assert silent.recv(1024) == b"", "the server hung up on it"
    silent.close()


def test_a_member_that_cannot_reach_the_connection_warns_and_uses_ray_calls():
    with socket.socket() as probe:  # a port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.warns(RuntimeWarning, match="exchanging through Ray calls instead"):
        client = CoordinatorClient(None, (("127.0.0.1", port), b"k" * 32))
    assert client.conn is None


@pytest.fixture
def no_margin(monkeypatch):
    """A client's reply bound is its ``timeout_s`` exactly (no margin), so these tests wait fractions of a second."""
    import poptrain.exchange.channel as channel

    monkeypatch.setattr(channel, "REPLY_MARGIN_S", 0.0)
    monkeypatch.setattr(channel, "REPLY_MARGIN_FRACTION", 0.0)


@pytest.fixture
def stuck():
    """A server whose ``exchange`` never returns within a test (a stuck coordinator thread), whose
    ``publish`` thread dies without replying (a BaseException in a pooled handler), and whose
    ``slow`` answers after its argument's seconds."""
    release = threading.Event()

    def exchange(kind, step, member, wire):
        release.wait(30)

    def publish(kind, step, member, wire):
        raise SystemExit  # the pool's thread takes it and lives on; no reply is sent

    def slow(delay):
        time.sleep(delay)
        return delay

    server = ChannelServer({"exchange": exchange, "publish": publish, "slow": slow}, host="127.0.0.1", inline=False, threads=8)
    yield server
    release.set()
    server.close()


def test_the_reply_bound_is_the_runs_exchange_timeout_plus_a_margin():
    assert reply_bound(None) is None
    assert reply_bound(300.0) == 300.0 + 5.0 + 75.0
    assert issubclass(ReplyTimeout, ExchangeTimeout)


@pytest.mark.parametrize("method", ["exchange", "publish"])
def test_a_coordinator_that_never_answers_is_a_timeout_naming_the_call_not_a_hang(no_margin, stuck, method):
    client = CoordinatorClient(None, (stuck.address, stuck.authkey), timeout_s=0.5)
    reply = client.call(method, "loss", 7, "m1", ())
    started = time.monotonic()
    with pytest.raises(
        ReplyTimeout,
        match=rf"{method} of 'loss' at step 7: member 'm1' waited 0.5 s for the coordinator's reply \(over the direct connection\) "
        r"and the coordinator did not answer.*exchange.timeout_s, 0.5 s.*its exchange thread may have died",
    ):
        reply()
    assert 0.45 < time.monotonic() - started < 3, "within about the bound"
    client.close()


def test_replies_to_other_requests_arriving_meanwhile_do_not_extend_the_bound(no_margin, stuck):
    client = CoordinatorClient(None, (stuck.address, stuck.authkey), timeout_s=1.0)
    held = client.call("exchange", "param", 3, "m2", ())
    delays = (0.6, 1.2, 1.8, 2.4)  # a reply every 0.6 s: a bound counted per message would never expire before 3.4 s
    others = [client.call("slow", d) for d in delays]
    started = time.monotonic()
    with pytest.raises(ReplyTimeout, match="exchange of 'param' at step 3: member 'm2' waited 1 s"):
        held()
    assert 0.95 < time.monotonic() - started < 2.0
    assert [other() for other in others] == list(delays), "the replies read meanwhile still reach their requests"
    client.close()


def test_without_a_timeout_a_client_waits_as_long_as_it_takes(stuck):
    client = CoordinatorClient(None, (stuck.address, stuck.authkey))
    assert client.bound_s is None and client.call("slow", 0.3)() == 0.3
    client.close()


def _other_address() -> str:
    """An address of this machine that is not loopback (skip when there is none)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        address = probe.getsockname()[0]
    except OSError:
        address = "127.0.0.1"
    finally:
        probe.close()
    if address.startswith("127."):
        pytest.skip("this machine has no address other than loopback")
    return address
