"""`free_port`: a loopback port nothing listens on, chosen outside the kernel's ephemeral range (from which Ray's many
processes draw their own ports while a test's server is starting)."""

import socket

import services.net as net


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((net.LOOPBACK, port))
        except OSError:
            return False
        return True


def test_free_ports_come_from_outside_the_ephemeral_range_and_are_free():
    low, high = net.PRIVATE_PORTS
    ephemeral = net.ephemeral_ports()
    assert ephemeral is None or ephemeral[0] > high, f"this machine's ephemeral range {ephemeral} overlaps {low}-{high}"
    ports = [net.free_port() for _ in range(20)]
    assert all(low <= port <= high for port in ports), ports
    assert all(_bindable(port) for port in ports)
    assert len(set(ports)) > 1, "chosen at random, not one fixed port"


def test_a_taken_port_is_never_returned(monkeypatch):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((net.LOOPBACK, 0))
    taken = listener.getsockname()[1]
    listener.listen()
    monkeypatch.setattr(net, "PRIVATE_PORTS", (taken, taken))          # the only candidate is taken: the OS picks
    try:
        assert net.free_port() != taken
    finally:
        listener.close()


def test_where_the_ephemeral_range_covers_the_private_ports_the_os_picks(monkeypatch, tmp_path):
    wide = tmp_path / "ip_local_port_range"
    wide.write_text("1024\t65535\n")
    assert net.ephemeral_ports(str(wide)) == (1024, 65535)
    assert net.ephemeral_ports(str(tmp_path / "missing")) is None

    class NoChoice:
        def randint(self, low, high):
            raise AssertionError("chose from PRIVATE_PORTS although the ephemeral range covers them")

    monkeypatch.setattr(net, "ephemeral_ports", lambda: (1024, 65535))
    monkeypatch.setattr(net.random, "SystemRandom", NoChoice)
    assert _bindable(net.free_port())
