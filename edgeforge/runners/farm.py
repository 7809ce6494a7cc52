"""The farm file: the devices bench can run on, and the runner each one gets.

    farm = load_farm("farm.toml")
    devices = farm.select("os=linux,soc=sm8650")   # labels (and name=, kind=) must all match; a bare word is a name
    runner = runner_for(devices[0])                # RUNNERS.get(device.kind)(device)
    runner = runner_for(default_device("local"))   # no farm file: this machine, as `bench --runner local`

A farm is TOML with one ``[[device]]`` table per device::

    [[device]]
    name = "pi5"                     # unique in the file
    kind = "ssh"                     # a runner name (edgeforge.runners.RUNNERS)
    labels = { os = "linux", soc = "bcm2712" }
    threads = 4                      # optional: threads each model runs with (default: every CPU allowed)
    cpu_mask = [0, 1, 2, 3]          # optional: the CPUs models may run on
    timeout_s = 600                  # optional: seconds any call to the device may take (default: per call, from
                                     # the workload; see edgeforge.runners.local.WorkerChannel.deadline_s)
    host = "pi5.lab"                 # the rest: the runner's connection fields (its ``Connection`` dataclass)
    user = "bench"
    identity_file = "keys/pi5"       # paths are relative to the farm file
    known_hosts = "keys/known_hosts"
    python = "/opt/edgeforge/bin/python"
    workdir = "/var/tmp/edgeforge"

A runner class names its connection fields with a frozen dataclass ``Connection`` (None or absent: the device takes
none); fields whose metadata says ``{"path": True}`` are resolved against the farm file's folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from edgeforge.errors import ConfigError, EdgeforgeError, UnknownNameError
from edgeforge.fileio import read_toml
from edgeforge.records import Record, described, encode
from edgeforge.runners import RUNNERS, Runner

DEVICE_KEYS = ("name", "kind", "labels", "threads", "cpu_mask", "timeout_s")


@dataclass(frozen=True)
class Device:
    """One device of a farm: what runs there (``kind``, a runner name), how to select it (``labels``), how models
    run there (``threads``, ``cpu_mask``; None: every CPU the device lets us use), how long a call to it may take
    before it counts as hung (``timeout_s``; None: a deadline per call) and how to reach it (``connection``: the
    runner's own ``Connection`` dataclass, None for this machine)."""

    name: str
    kind: str
    labels: dict[str, str] = field(default_factory=dict)
    threads: int | None = None
    cpu_mask: tuple[int, ...] | None = None
    timeout_s: float | None = None
    connection: object | None = None

    def matches(self, term: str) -> bool:
        """``key=value`` against the labels (``name``/``kind`` against the device's own), a bare word: the name."""
        key, equals, value = (part.strip() for part in term.partition("="))
        if not equals:
            return key == self.name
        return {"name": self.name, "kind": self.kind, **self.labels}.get(key) == value

    def to_dict(self) -> dict:
        """The JSON object (the connection's fields with paths as strings)."""
        return encode(self)


@dataclass(frozen=True)
class Farm:
    path: Path
    devices: tuple[Device, ...]

    def select(self, expression: str | None) -> list[Device]:
        """The devices matching every comma-separated term of ``expression`` (None or "": all of them)."""
        terms = [term.strip() for term in (expression or "").split(",") if term.strip()]
        chosen = [device for device in self.devices if all(device.matches(term) for term in terms)]
        if not chosen:
            raise ConfigError(f"no device matches {expression!r}; devices: "
                              f"{', '.join(_describe(device) for device in self.devices)}", path=self.path)
        return chosen


def load_farm(path: str | Path) -> Farm:
    """The farm file at ``path``; ConfigError (naming the file and the device) for anything malformed."""
    path = Path(path)
    tables = read_toml(path)
    if set(tables) - {"device"} or not isinstance(tables.get("device"), list) or not tables["device"]:
        raise ConfigError("a farm file holds [[device]] tables and nothing else", path=path)
    devices: list[Device] = []
    for index, table in enumerate(tables["device"], start=1):
        device = _device(table, path, f"device #{index}")
        if any(device.name == other.name for other in devices):
            raise ConfigError(f"device {device.name!r} is named twice", path=path)
        devices.append(device)
    return Farm(path=path, devices=tuple(devices))


@dataclass(frozen=True, kw_only=True)
class DeviceStatus:
    """One device as ``edgeforge devices`` found it: reachable or not (``problem`` says why), and what it runs."""

    device: Device = described("the farm's entry")
    reachable: bool = described("the runner reached the device and started edgeforge's worker there")
    problem: str | None = described("why it is not reachable or not checked, one line", default=None)
    python: str | None = described("the device's Python version", default=None)
    edgeforge: str | None = described("edgeforge's version there", default=None)
    cpus: int | None = described("CPUs a model may run on there", default=None)
    versions: dict = described("package versions there (null: not installed)", default_factory=dict)
    runtimes: dict[str, str | None] = described("artifact format -> null when its runtime imports, else why not",
                                                default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class DevicesReport(Record):
    """What ``edgeforge devices`` found, one entry per device of the farm."""

    kind = "edgeforge.devices"
    version = 1

    farm: str = described("the farm file")
    devices: list[DeviceStatus] = described("in the farm's order")


def check_devices(farm: Farm, devices: list[Device] | None = None) -> DevicesReport:
    """Reach every device (all at once, a thread each) and ask what it runs; a device that fails is a status with
    its one-line problem, never an exception."""
    from concurrent.futures import ThreadPoolExecutor

    chosen = list(farm.devices if devices is None else devices)
    with ThreadPoolExecutor(max_workers=max(len(chosen), 1)) as pool:
        statuses = list(pool.map(_check, chosen))
    return DevicesReport(farm=str(farm.path), devices=statuses)


def _check(device: Device) -> DeviceStatus:
    try:
        runner = runner_for(device)
        if not hasattr(runner, "probe"):
            return DeviceStatus(device=device, reachable=False,
                                problem=f"not checked: the {runner.name} runner has no probe()")
        found = runner.probe()
    except EdgeforgeError as exc:
        return DeviceStatus(device=device, reachable=False, problem=str(exc))
    return DeviceStatus(device=device, reachable=True, **found)


def default_device(kind: str) -> Device:
    """The device of a run without a farm file: the runner ``kind`` with no connection (``local``: this machine)."""
    return Device(name=kind, kind=kind)


def runner_for(device: Device) -> Runner:
    """The runner that measures on ``device``: its kind's runner class (from RUNNERS), made for it."""
    return RUNNERS.get(device.kind)(device)


def _device(table: dict, path: Path, where: str) -> Device:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} is not a table", path=path)
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where} has no name (a non-empty string)", path=path)
    where = f"device {name!r}"
    kind = table.get("kind")
    if kind not in RUNNERS:
        raise ConfigError(f"{where}: {UnknownNameError('runner kind', str(kind), RUNNERS.names()).problem}", path=path)
    labels = table.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(value, str) for value in labels.values()):
        raise ConfigError(f"{where}: labels must be a table of strings, e.g. {{ os = \"linux\" }}", path=path)
    threads = table.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"{where}: threads must be a positive integer, got {threads!r}", path=path)
    cpu_mask = table.get("cpu_mask")
    if cpu_mask is not None and (not isinstance(cpu_mask, list) or not cpu_mask or not all(
            isinstance(cpu, int) and not isinstance(cpu, bool) and cpu >= 0 for cpu in cpu_mask)):
        raise ConfigError(f"{where}: cpu_mask must be a non-empty list of CPU ids, got {cpu_mask!r}", path=path)
    timeout_s = table.get("timeout_s")
    if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool)
                                  or timeout_s <= 0):
        raise ConfigError(f"{where}: timeout_s must be a positive number of seconds, got {timeout_s!r}", path=path)
    connection = _connection(RUNNERS.get(kind), {k: v for k, v in table.items() if k not in DEVICE_KEYS},
                             path, where)
    return Device(name=name, kind=kind, labels=dict(labels), threads=threads,
                  cpu_mask=tuple(cpu_mask) if cpu_mask else None, timeout_s=timeout_s, connection=connection)


def check_connection(connection, *, strings: tuple[str, ...] = (), folders: tuple[str, ...] = (),
                     ports: tuple[str, ...] = ()) -> None:
    """A runner's ``Connection`` check: ConfigError for a field of ``strings`` that is not a non-empty string, of
    ``folders`` that is not an absolute path on the device, of ``ports`` that is not an integer in 1..65535."""
    import posixpath

    for name in strings + folders:
        if not isinstance(getattr(connection, name), str) or not getattr(connection, name):
            raise ConfigError(f"{name} must be a non-empty string, got {getattr(connection, name)!r}")
    for name in folders:
        if not posixpath.isabs(getattr(connection, name)):
            raise ConfigError(f"{name} must be an absolute path on the device, got {getattr(connection, name)!r}")
    for name in ports:
        port = getattr(connection, name)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"{name} must be an integer in 1..65535, got {port!r}")


def _connection(runner_class, given: dict, path: Path, where: str):
    """The runner's ``Connection`` from the device table's other keys: none unknown, none required missing."""
    connection_type = getattr(runner_class, "Connection", None)
    known = {f.name: f for f in dataclasses.fields(connection_type)} if connection_type else {}
    unknown = sorted(set(given) - set(known))
    if unknown:
        allowed = ", ".join([*DEVICE_KEYS, *known])
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for kind {runner_class.name!r} "
                          f"(allowed: {allowed})", path=path)
    if connection_type is None:
        return None
    required = [f.name for f in known.values()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in given]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)} (kind {runner_class.name!r} needs "
                          f"{', '.join(required)})", path=path)
    try:
        values = {name: path.parent / Path(value).expanduser() if known[name].metadata.get("path") else value
                  for name, value in given.items()}
        return connection_type(**values)
    except ConfigError as exc:  # the Connection's own check
        raise ConfigError(f"{where}: {exc.problem}", path=path) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}", path=path) from exc


def _describe(device: Device) -> str:
    labels = ",".join(f"{key}={value}" for key, value in device.labels.items())
    return f"{device.name} ({device.kind}{'; ' + labels if labels else ''})"
