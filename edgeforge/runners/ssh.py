"""The ``ssh`` runner: a Linux machine (a Raspberry Pi, a Jetson, an ARM server) reached over SSH, which has a
Python with edgeforge and the runtimes installed. The measurement is edgeforge's own: the JSON-lines worker
(:mod:`edgeforge.runners.local_worker`) started there, spoken to over the SSH channel's stdin/stdout exactly as
the local runner speaks to it over a pipe (:class:`edgeforge.runners.local.WorkerChannel`), so the device's facts
(its ``describe_machine``), its bandwidth test and every timing come from the remote machine.

Models are uploaded over SFTP to ``workdir/<content sha256>/`` (the model's folder, or a single-file checkpoint's
folder, so its tokenizer comes along; the hash is :func:`edgeforge.fileio.content_sha256`'s) unless that folder
is already there complete: a marker file is written last, so an interrupted upload is redone. The worker loads
the remote path.

Authentication is by key only (the device's ``identity_file``; no agent, no password), and the host key is
checked against the device's ``known_hosts`` file: a host not in it, or with another key, is refused.

Library: paramiko. It is maintained, pure Python over ``cryptography``, speaks SSH and SFTP in one connection,
and is synchronous: bench's farm matrix runs one thread per device, and a blocking client per thread fits it,
where asyncssh would need an event loop in each thread; the ``ssh`` binary would need its errors parsed from
text and a second tool for the upload.
"""

from __future__ import annotations

import io
import posixpath
import shlex
import stat
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from edgeforge.errors import ConfigError, RuntimeFailure
from edgeforge.fileio import content_files, content_sha256
from edgeforge.runners import Environment
from edgeforge.runners.local import WORKER_MODULE, WorkerChannel, WorkerModel, last_line, measure_bandwidth_in

UPLOADED = ".edgeforge-uploaded"  # written last into an uploaded folder: the upload is complete
CONNECT_TIMEOUT_S = 10
EXIT_WAIT_S = 10  # a worker's exit after its stdin closed, or its exit status after its replies stopped


@dataclass(frozen=True)
class SshConnection:
    """How to reach an ssh device (its farm table's keys). python: the remote interpreter with edgeforge and the
    runtimes; workdir: the remote folder models are uploaded into."""

    host: str
    user: str
    identity_file: Path = field(metadata={"path": True})
    known_hosts: Path = field(metadata={"path": True})
    python: str
    workdir: str
    port: int = 22

    def __post_init__(self):
        from edgeforge.runners.farm import check_connection

        check_connection(self, strings=("host", "user", "python"), folders=("workdir",), ports=("port",))

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


class SshRunner:
    name = "ssh"
    Connection = SshConnection

    def __init__(self, device):
        if not isinstance(device.connection, SshConnection):
            raise ConfigError(f"the ssh runner needs a device from a farm file (its host, user, identity_file, "
                              f"known_hosts, python, workdir); {device.name!r} has none: pass --farm")
        self.device, self.connection = device, device.connection

    def environment(self, *, threads: int | None) -> Environment:
        with RemoteWorker(self, "the device facts", bandwidth_only=True) as worker:
            return Environment(**worker.channel.call("environment", threads=threads or self.device.threads,
                                                     cpu_mask=self.device.cpu_mask))

    def measure_bandwidth(self, environment: Environment, *, repetitions: int, size_bytes: int | None,
                          probe_bytes: tuple[int, ...]):
        with RemoteWorker(self, "the bandwidth test", bandwidth_only=True) as worker:
            return measure_bandwidth_in(worker.channel, environment, repetitions=repetitions, size_bytes=size_bytes,
                                        probe_bytes=probe_bytes)

    def prepare(self, model, environment: Environment) -> WorkerModel:
        client = self.connect()
        try:
            remote_path = self.upload(client, Path(model.path))
        except BaseException:
            client.close()
            raise
        return WorkerModel(RemoteWorker(self, model.label, client=client), model, environment, path=remote_path)

    def probe(self) -> dict:
        """What the device runs (``local_worker``'s probe, there)."""
        with RemoteWorker(self, "the device check", bandwidth_only=True) as worker:
            return worker.channel.call("probe")

    # ---- the connection ----

    def connect(self):
        """A connected ``paramiko.SSHClient``: key auth, host key checked against known_hosts; else one line."""
        import paramiko

        connection, where = self.connection, f"device {self.device.name!r} ({self.connection.address})"
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(str(connection.known_hosts))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read the known_hosts file: {exc.strerror}",
                              path=connection.known_hosts) from exc
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(connection.host, port=connection.port, username=connection.user,
                           key_filename=str(connection.identity_file), look_for_keys=False, allow_agent=False,
                           timeout=CONNECT_TIMEOUT_S, banner_timeout=CONNECT_TIMEOUT_S, auth_timeout=CONNECT_TIMEOUT_S)
        except paramiko.BadHostKeyException as exc:
            raise RuntimeFailure(f"{where}: refused: its host key ({exc.key.get_name()}) is not the one the "
                                 "known_hosts file holds for it", path=connection.known_hosts) from None
        except paramiko.AuthenticationException:
            raise RuntimeFailure(f"{where}: the key was not accepted", path=connection.identity_file) from None
        except paramiko.SSHException as exc:
            unknown = "not found in known_hosts" in str(exc)
            raise RuntimeFailure(f"{where}: refused: the host is not in the known_hosts file" if unknown else
                                 f"{where}: SSH failed: {exc}", path=connection.known_hosts if unknown else None) \
                from None
        except FileNotFoundError as exc:
            raise ConfigError(f"{where}: cannot read the identity file: {exc.strerror}",
                              path=connection.identity_file) from None
        except (OSError, EOFError) as exc:  # refused, timed out, no route; EOFError: the peer hung up
            causes = getattr(exc, "errors", {}).values() or [exc]  # NoValidConnectionsError: one per address tried
            reasons = dict.fromkeys(getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
                                    for cause in causes)
            raise RuntimeFailure(f"{where}: unreachable: {'; '.join(reasons)}") from None
        return client

    def upload(self, client, local: Path) -> str:
        """``local``'s folder at ``workdir/<content sha256>/`` (uploaded unless already complete there); the remote
        path of ``local``."""
        folder = local if local.is_dir() else local.parent
        remote = posixpath.join(self.connection.workdir, content_sha256(folder))
        sftp = client.open_sftp()
        try:
            if not _exists(sftp, posixpath.join(remote, UPLOADED)):
                files = content_files(folder)
                for directory in sorted({posixpath.dirname(posixpath.join(remote, f.relative_to(folder).as_posix()))
                                         for f in files} | {remote}):
                    _makedirs(sftp, directory)
                for file in files:
                    sftp.put(str(file), posixpath.join(remote, file.relative_to(folder).as_posix()))
                with sftp.open(posixpath.join(remote, UPLOADED), "w") as marker:
                    marker.write(f"{len(files)} files from {folder}\n")
        except OSError as exc:
            raise RuntimeFailure(f"device {self.device.name!r}: upload of {folder} to {remote} failed: "
                                 f"{exc.strerror or exc}") from None
        finally:
            sftp.close()
        return remote if local.is_dir() else posixpath.join(remote, local.name)


def _exists(sftp, path: str) -> bool:
    try:
        sftp.stat(path)
        return True
    except FileNotFoundError:
        return False


def _makedirs(sftp, path: str) -> None:
    """mkdir -p over SFTP."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        directory = "/" + "/".join(parts[:depth])
        try:
            if not stat.S_ISDIR(sftp.stat(directory).st_mode):
                raise RuntimeFailure(f"{directory} exists on the device and is not a folder")
        except FileNotFoundError:
            sftp.mkdir(directory)


class RemoteWorker:
    """A local_worker started on the device over an SSH channel, spoken to through ``channel``. ``client``: an open
    connection it then owns (default: a new one)."""

    def __init__(self, runner: SshRunner, name: str, *, bandwidth_only: bool = False, client=None):
        self.client = client or runner.connect()
        try:
            self.session = self.client.get_transport().open_session()
            self.command = [runner.connection.python, "-m", WORKER_MODULE] + ["--bandwidth-only"] * bandwidth_only
            self.session.exec_command(shlex.join(self.command))
        except BaseException:
            self.client.close()
            raise
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self.stderr_reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self.stderr_reader.start()  # unread stderr would fill the channel's window and stall the worker
        self.channel = WorkerChannel(f"{name} on {runner.device.name}", self.session.makefile_stdin("w"),
                                     _line_reader(self.session), ended=self._ended, stop=self._stop,
                                     timeout_s=runner.device.timeout_s)

    def _stop(self) -> None:
        """Close the channel of a worker that stopped answering (its transport may already be gone)."""
        try:
            self.session.close()
        except (EOFError, OSError):
            pass

    def _drain_stderr(self) -> None:
        for line in self.session.makefile_stderr("r"):
            self.stderr_tail.append(line)

    def _ended(self) -> tuple[int | None, str]:
        status = _exit_status(self.session)
        self.stderr_reader.join(timeout=1)
        return status, last_line("".join(self.stderr_tail)) if self.stderr_tail else "the SSH connection was lost"

    def __enter__(self) -> RemoteWorker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """End the worker (its stdin closed ends its loop; the channel is closed after EXIT_WAIT_S), then the
        connection."""
        try:
            if not self.session.closed:
                self.session.shutdown_write()
                _exit_status(self.session)
            self.session.close()
        finally:
            self.client.close()


def _exit_status(session) -> int | None:
    """The remote command's exit status, waited for up to EXIT_WAIT_S (None: it did not end; -1: the channel closed
    without one)."""
    session.status_event.wait(EXIT_WAIT_S)  # set by the exit status, or by the channel closing
    return session.exit_status if session.exit_status_ready() else None


class _ChannelStdout(io.RawIOBase):
    """A paramiko channel's stdout as a raw stream, so io's C buffering reads its lines.

    paramiko's own ``makefile`` grows a line by concatenation, 8 KiB at a time: quadratic, so a 67 MB reply (a
    window's full logits) took many minutes of CPU to read."""

    def __init__(self, session):
        self._session = session

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._session.recv(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _line_reader(session) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BufferedReader(_ChannelStdout(session), buffer_size=1 << 20), encoding="utf-8")

