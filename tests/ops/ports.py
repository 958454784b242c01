"""A loopback port for a server the ops scripts start (shared by them; each runs as a script, so
its own folder is on sys.path)."""

import socket


def free_port() -> int:
    # the OS picks an unused port; the server binds it a moment later, after this socket closes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
