"""The bench matrix on a Ray cluster: each device's session runs as a Ray task on the lab host that owns the device.

    with RaySessions("head.lab:6379") as sessions:        # or "auto" on a node of the cluster
        record = bench_matrix(artifacts, devices, "runs", run_session=sessions)   # edgeforge.verify.matrix

A lab host offers each device attached to it as a custom resource when it joins the cluster::

    ray start --address head.lab:6379 --resources '{"edgeforge-device:pixel8": 1}'

A session asks for one ``edgeforge-device:<name>`` and no CPU (the device does the work), so Ray places it on that
host and runs one session per device at a time; no scheduling of edgeforge's own. The task is
:func:`edgeforge.verify.matrix.measure_session`, unchanged, with the runners installed on that host; its progress
streams back as it happens and its jobs when the session ends, and the driver writes them under its own output
folder at once (:func:`~edgeforge.verify.matrix.bench_matrix`, as with its threads). A task that dies (its worker or
its host gone) and a device no host offers are RuntimeFailures of that device: retried, then marked failed, other
devices untouched. The host reads the artifacts (and a device's key files) at the driver's paths, so they must be on
storage every host mounts at the same path; one that is missing there or differs is a one-line ConfigError.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from edgeforge.errors import ConfigError, EdgeforgeError, RuntimeFailure
from edgeforge.verify.matrix import measure_session, one_line

RESOURCE_PREFIX = "edgeforge-device:"


def device_resource(name: str) -> str:
    """The Ray custom resource a lab host offers for the device ``name``."""
    return f"{RESOURCE_PREFIX}{name}"


class RaySessions:
    """``bench_matrix``'s ``run_session`` through the Ray cluster at ``address``; a context manager that connects and
    disconnects (a connection this process already has is used as it is, and kept). ``nodes``: device name -> the
    Ray node id its last session ran on."""

    def __init__(self, address: str):
        self.address = address
        self.nodes: dict[str, str] = {}
        self._task = None
        self._connected_here = False

    def __enter__(self) -> RaySessions:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("--ray needs Ray: pip install 'edgeforge[farm]'") from exc
        try:
            if not ray.is_initialized():
                ray.init(address=self.address, logging_level=logging.ERROR, log_to_driver=False)
                self._connected_here = True
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RuntimeFailure(f"cannot join the Ray cluster at {self.address}: {one_line(exc)}") from exc
        self._task = ray.remote(num_cpus=0, max_retries=0)(_remote_session)
        return self

    def __exit__(self, *exc_info) -> None:
        import ray

        if self._connected_here:
            ray.shutdown()

    def __call__(self, device, pending, settings, workload, attempt, say) -> list:
        """Run :func:`~edgeforge.verify.matrix.measure_session` on the node offering ``device``'s resource."""
        import ray

        resource = device_resource(device.name)
        if not ray.cluster_resources().get(resource):
            raise RuntimeFailure(f"no host of the Ray cluster at {self.address} offers {resource}: start the one the "
                                 f"device is attached to with ray start --resources '{{\"{resource}\": 1}}'")
        stream = self._task.options(resources={resource: 1}, name=f"edgeforge-bench-{device.name}").remote(
            device, pending, settings, workload, attempt)
        try:
            for ref in stream:
                kind, value = ray.get(ref)
                if kind == "node":
                    self.nodes[device.name] = value
                    say(f"session on Ray node {value[:12]}")
                elif kind == "say":
                    say(value)
                elif kind == "failed":
                    retry, message = value
                    raise (RuntimeFailure if retry else ConfigError)(message)
                else:
                    return value
        except ray.exceptions.RayTaskError as exc:  # a bug in the task: raised as it is
            raise exc.cause if exc.cause is not None else exc
        except ray.exceptions.RayError as exc:  # its worker, its host or the connection died
            raise RuntimeFailure(f"the Ray task of {device.name} died: {one_line(exc)}") from exc
        raise RuntimeFailure(f"the Ray task of {device.name} ended without its jobs")


def _remote_session(device, pending, settings, workload, attempt):
    """On the device's host: yields ("node", id), ("say", message)... and ("jobs", jobs) or ("failed", (retry,
    message)); edgeforge's errors travel as their message (a retry for runtime and connection failures)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    yield "node", node
    messages, outcome = queue.SimpleQueue(), {}

    def measure() -> None:
        try:
            _check_artifacts_here(pending, node)
            outcome["jobs"] = measure_session(device, pending, settings, workload, attempt, messages.put)
        except (EdgeforgeError, OSError) as exc:
            outcome["failed"] = (isinstance(exc, (RuntimeFailure, OSError)), one_line(exc))
        except BaseException as exc:  # a bug: raised by the task, so the driver sees it
            outcome["bug"] = exc
        finally:
            messages.put(None)

    thread = threading.Thread(target=measure, name=f"bench-{device.name}", daemon=True)
    thread.start()
    while (message := messages.get()) is not None:
        yield "say", message
    thread.join()
    if "bug" in outcome:
        raise outcome["bug"]
    yield ("failed", outcome["failed"]) if "failed" in outcome else ("jobs", outcome["jobs"])


def _check_artifacts_here(pending, node: str) -> None:
    """Each artifact is at its path on this host, with the content the driver hashed."""
    from edgeforge.fileio import content_sha256

    for model, artifact in pending:
        if not Path(model.path).exists() or content_sha256(model.path) != artifact.sha256:
            state = "differs" if Path(model.path).exists() else "is missing"
            raise ConfigError(f"{model.path} {state} on Ray node {node[:12]}: put the artifacts on storage every "
                              "host mounts at the same path")
