"""The daemon's resolver: numeric hosts answered on the loop, names through gevent's thread pool,
the same answers as the stdlib either way."""

from __future__ import annotations

import _socket
import socket

import gevent
import pytest

from ivr_daemon.resolver import NumericFirstResolver, install


class RecordingPool:
    """The hub's thread pool, noting what it is asked to run."""

    def __init__(self, pool):
        self._pool = pool
        self.asked: list[tuple] = []

    def apply(self, function, args=(), kwargs=None):
        self.asked.append(tuple(args))
        return self._pool.apply(function, args, kwargs)


@pytest.fixture
def resolver():
    made = NumericFirstResolver(hub=gevent.get_hub())
    made.pool = RecordingPool(made.pool)
    made.asked_pool = made.pool.asked
    yield made


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "192.0.2.7"])
def test_a_numeric_host_is_answered_without_the_thread_pool(resolver, host):
    answer = resolver.getaddrinfo(host, 8080, 0, socket.SOCK_STREAM)
    assert answer == _socket.getaddrinfo(host, 8080, 0, socket.SOCK_STREAM)
    assert resolver.asked_pool == []


def test_a_name_is_looked_up_on_the_thread_pool_as_before(resolver):
    answer = resolver.getaddrinfo("localhost", 80, 0, socket.SOCK_STREAM)
    assert answer == _socket.getaddrinfo("localhost", 80, 0, socket.SOCK_STREAM)
    assert resolver.asked_pool == [("localhost", 80, 0, socket.SOCK_STREAM, 0, 0)]


def test_a_host_that_cannot_resolve_fails_as_before(resolver):
    with pytest.raises(socket.gaierror):
        resolver.getaddrinfo("no-such-host.invalid", 80)


def test_install_puts_it_on_the_hub_once():
    hub = gevent.get_hub()
    before = hub.resolver
    try:
        install()
        installed = hub.resolver
        install()
        assert isinstance(installed, NumericFirstResolver) and hub.resolver is installed
        assert [info[4] for info in socket.getaddrinfo("127.0.0.1", 9, 0, socket.SOCK_STREAM)] == [("127.0.0.1", 9)]
    finally:
        hub.resolver = before
