"""A stand-in adb server for the adb runner's tests: it speaks adb's wire protocol (the smart-socket requests
``host:version``, ``host:devices``, ``host-serial:S:features``, ``host:tport:serial:S``, then ``shell,v2:`` with its
stdout/stderr/exit packets, or ``sync:`` with STAT and SEND), so the real adbutils client talks to it over TCP. What
a shell command prints comes from ``shell(command) -> (stdout, stderr, exit code)``, the test's model of the phone;
pushed files are kept in ``files`` (path -> (mode, bytes)).
"""

from __future__ import annotations

import socket
import struct
import threading

SERVER_VERSION = 41  # platform-tools 1.0.41: transports are opened with host:tport:serial


class FakeAdbServer:
    def __init__(self, devices: str, shell=None):
        self.devices, self.shell = devices, shell
        self.files: dict[str, tuple[int, bytes]] = {}
        self.commands: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(client,), daemon=True).start()

    def _session(self, client: socket.socket) -> None:
        with client:
            while (request := _request(client)) is not None:
                if request == "host:version":
                    return _okay(client, f"{SERVER_VERSION:04x}")
                if request == "host:devices":
                    return _okay(client, self.devices)
                if request.startswith("host-serial:") and request.endswith(":features"):
                    return _okay(client, "shell_v2,cmd,stat_v2")
                if request.startswith("host:tport:serial:"):
                    client.sendall(b"OKAY" + struct.pack("<Q", 1))  # then the transport's request, on this socket
                    continue
                if request.startswith("shell,v2:"):
                    return self._shell(client, request.removeprefix("shell,v2:"))
                if request == "sync:":
                    client.sendall(b"OKAY")
                    return self._sync(client)
                message = f"unknown request {request!r}".encode()
                return client.sendall(b"FAIL" + b"%04x" % len(message) + message)

    def _shell(self, client: socket.socket, command: str) -> None:
        self.commands.append(command)
        stdout, stderr, code = self.shell(command)
        client.sendall(b"OKAY")
        for stream, text in ((1, stdout), (2, stderr)):
            data = text.encode()
            if data:
                client.sendall(bytes([stream]) + struct.pack("<I", len(data)) + data)
        client.sendall(bytes([3]) + struct.pack("<I", 1) + bytes([code]))

    def _sync(self, client: socket.socket) -> None:
        command, length = client.recv(4).decode(), struct.unpack("<I", _exactly(client, 4))[0]
        path = _exactly(client, length).decode()
        if command == "STAT":
            mode, data = self.files.get(path, (0, b""))
            return client.sendall(b"STAT" + struct.pack("<III", mode, len(data), 1 if mode else 0))
        target, _, mode = path.rpartition(",")
        data = b""
        while _exactly(client, 4) == b"DATA":
            data += _exactly(client, struct.unpack("<I", _exactly(client, 4))[0])
        _exactly(client, 4)  # DONE's mtime
        self.files[target] = (int(mode), data)
        client.sendall(b"OKAY" + struct.pack("<I", 0))


def _request(client: socket.socket) -> str | None:
    length = client.recv(4)
    return _exactly(client, int(length, 16)).decode() if len(length) == 4 else None


def _okay(client: socket.socket, block: str) -> None:
    data = block.encode()
    client.sendall(b"OKAY" + b"%04x" % len(data) + data)


def _exactly(client: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = client.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client hung up")
        data += chunk
    return data
