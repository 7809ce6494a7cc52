"""Third-party noise off stderr while a command runs; ``edgeforge --debug`` lets all of it through.

Three channels carry it, each closed at its source:

- Python ``warnings`` (torch's FutureWarnings, ExecuTorch's UserWarnings): ignored;
- ``logging`` records below ERROR, which only other packages emit (torchao's "Failed to load ...",
  torch's pytree notices, coremltools' proxy messages): disabled, errors still pass;
- text C/C++ libraries print themselves: off through the library's own switch where it has one
  (``TORCH_CPP_LOG_LEVEL``, :func:`onnxruntime_severity`); ExecuTorch's runtime has none (its log
  level is fixed at build time), so :func:`held_native_stderr` holds what it prints around a call
  and shows it only if the call fails.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Read by the C++ libraries when they load, so set before the first import of torch.
NATIVE_LOG_ENV = {"TORCH_CPP_LOG_LEVEL": "ERROR"}
ONNXRUNTIME_ERROR, ONNXRUNTIME_WARNING = 3, 2  # onnxruntime's severity levels (ERROR, and its default)

_quiet = False


@contextmanager
def third_party_quiet(enabled: bool = True) -> Iterator[None]:
    """Keep other packages' warnings and log records below ERROR off stderr for the block; everything is
    restored after it, so a caller in the same process (a test) keeps its own settings."""
    global _quiet
    if not enabled:
        yield
        return
    added_env = {name: value for name, value in NATIVE_LOG_ENV.items() if name not in os.environ}
    os.environ.update(added_env)  # a value the user set stays
    disabled_before = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        _quiet = True
        try:
            yield
        finally:
            _quiet = False
            logging.disable(disabled_before)
            for name in added_env:
                os.environ.pop(name, None)


def onnxruntime_severity() -> int:
    """onnxruntime's minimum log severity: errors only while quiet, its default otherwise."""
    return ONNXRUNTIME_ERROR if _quiet else ONNXRUNTIME_WARNING


@contextmanager
def held_native_stderr() -> Iterator[None]:
    """Around a call into a C/C++ runtime that prints to stderr with no switch to stop it: while quiet,
    what the block writes to file descriptor 2 or to ``sys.stderr`` (where pybind11 sends C++'s
    ``std::cerr``) is held, dropped if the block succeeds and written to stderr if it raises, so a
    failure still shows the runtime's own message above edgeforge's error line."""
    if not _quiet:
        yield
        return
    sys.stderr.flush()
    python_stderr, held_python = sys.stderr, io.StringIO()
    with tempfile.TemporaryFile() as held_fd:
        saved_fd = os.dup(2)
        os.dup2(held_fd.fileno(), 2)
        sys.stderr = held_python
        try:
            yield
        except BaseException:
            os.dup2(saved_fd, 2)
            held_fd.seek(0)
            python_stderr.write(held_fd.read().decode(errors="replace") + held_python.getvalue())
            python_stderr.flush()
            raise
        finally:
            sys.stderr = python_stderr
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
