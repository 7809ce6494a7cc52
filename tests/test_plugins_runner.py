"""A runner from outside edgeforge: a fake installed distribution on sys.path declares ``toy`` in the
``edgeforge.runners`` entry-point group, and ``edgeforge bench --runner toy`` lists and uses it with no edit
inside edgeforge/. The toy runs the model in this process (through edgeforge's own model opener) and
reports fixed device facts and bandwidth, so the report must carry exactly what it measured and said.
"""

import importlib
import json
import sys

import pytest
from click.testing import CliRunner

from edgeforge.cli import main
from edgeforge.runners import RUNNERS

TOY_RUNNER = '''
import time

from edgeforge.runners import Environment, LoadFacts, Samples
from edgeforge.verify.machine import Bandwidth, Machine

TIMED = {}  # model path -> every round's Samples, warm-up included, in the order they ran

FACTS = dict(cpu_model="toy-npu", logical_cpus=8, usable_cpus=8, threads=2, governor=None, cur_freq_khz=None,
             max_freq_khz=None, llc_bytes=None, memory_total_bytes=2**33, load_average_1m=0.0, os="toyOS 1",
             kernel="1.0", python="3.11", edgeforge="0", git_commit=None, versions={"toy-runtime": "1.0"},
             timestamp="2026-01-01T00:00:00Z")


class ToyRunner:
    name = "toy"

    def __init__(self, device):
        self.device = device

    def environment(self, *, threads):
        threads = threads or 2
        return Environment(threads=threads, cores=[0, 1], machine=Machine(**{**FACTS, "threads": threads}).to_dict())

    def measure_bandwidth(self, environment, *, repetitions, size_bytes, probe_bytes):
        return Bandwidth(read_samples_gb_s=[10.0] * repetitions, copy_samples_gb_s=[8.0] * repetitions,
                         working_set_bytes=1 << 30, llc_bytes=None, threads=environment.threads,
                         probes=[{"bytes": size, "threads": 1, "read_samples_gb_s": [12.0]} for size in probe_bytes],
                         note=None)

    def prepare(self, model, environment):
        return ToyModel(model)


class ToyModel:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.session = None

    def load(self):
        from edgeforge.verify.models import describe_model, open_session

        start = time.perf_counter()
        self.session = open_session(describe_model(self.model.path), max_seq_len=self.model.max_seq_len)
        return LoadFacts(import_s=0.25, load_s=time.perf_counter() - start, rss_after_import_bytes=1 << 20,
                         rss_after_load_bytes=2 << 20, threads_note="toy: in-process")

    def run(self, workload):
        import torch

        def forward(ids, first):
            logits = self.session.forward(torch.tensor([ids]), torch.arange(first, first + len(ids)))
            return int(logits[0, -1].argmax())

        prefill_s = []
        for prompt in workload.prompts:
            start = time.perf_counter()
            forward(prompt, 0)
            prefill_s.append(time.perf_counter() - start)
        token = forward(workload.decode_context, 0)
        start = time.perf_counter()
        for step in range(workload.decode_tokens):
            token = forward([token], len(workload.decode_context) + step)
        samples = Samples(prefill_s=prefill_s, decode_s=time.perf_counter() - start)
        TIMED.setdefault(str(self.model.path), []).append(samples)
        return samples

    def finish(self):
        return 3 << 20
'''


@pytest.fixture
def toy_runner(tmp_path, monkeypatch):
    """The toy runner's module and a dist-info declaring it, on sys.path; the registry forgets it afterwards."""
    (tmp_path / "toy_runner.py").write_text(TOY_RUNNER)
    dist_info = tmp_path / "toyplugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[edgeforge.runners]\ntoy = toy_runner:ToyRunner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with RUNNERS.isolated(empty=True):  # what the registry loads here is dropped afterwards
        yield
        monkeypatch.undo()
    sys.modules.pop("toy_runner", None)


def test_toy_runner_from_outside_the_package_is_listed_and_its_samples_reach_the_report(toy_runner, tmp_path,
                                                                                      stories_int4):
    help_text = CliRunner().invoke(main, ["bench", "--help"]).output
    assert "[adb|aihub|local|ssh|toy]" in help_text, help_text

    out = tmp_path / "bench.json"
    args = ["bench", str(stories_int4), "--runner", "toy", "--prompt-lengths", "4,8", "--decode-tokens", "3",
            "-r", "2", "--warmup", "1", "--json", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    assert "on the toy runner" in result.stderr and "machine: toy-npu" in result.stdout

    data = json.loads(out.read_text())
    assert data["machine"]["cpu_model"] == "toy-npu" and data["machine"]["versions"] == {"toy-runtime": "1.0"}
    assert data["settings"]["threads"] == 2 and data["settings"]["cores"] == [0, 1]
    assert data["bandwidth"]["ceiling_gb_s"] == 10.0
    timed = importlib.import_module("toy_runner").TIMED
    candidate, reference = data["models"]
    assert [model["path"] for model in data["models"]] == list(timed), "the candidate and its fp32 reference"
    for model in data["models"]:
        rounds = timed[model["path"]][1:]  # after the warm-up round
        pp4, pp8, tg3 = model["tests"]
        assert pp4["samples_s"] == [samples.prefill_s[0] for samples in rounds]
        assert pp8["samples_s"] == [samples.prefill_s[1] for samples in rounds]
        assert tg3["samples_s"] == [samples.decode_s for samples in rounds]
        assert model["peak_rss_bytes"] == 3 << 20 and model["threads_note"] == "toy: in-process"
    assert candidate["scheme"] == "8da4w" and candidate["format"] == "eager" and reference["scheme"] == "fp32"
    assert candidate["tests"][0]["speedup"]["n"] == 2


def test_unknown_runner_is_refused_with_the_registered_names(toy_runner, stories_int4):
    result = CliRunner().invoke(main, ["bench", str(stories_int4), "--runner", "telnet"])
    assert result.exit_code == 2, result.output + result.stderr
    assert "'telnet' is not one of 'adb', 'aihub', 'local', 'ssh', 'toy'" in result.stderr and \
        "Traceback" not in result.stderr


def test_bench_api_refuses_an_unknown_runner_naming_the_known_ones(stories_int4):
    from edgeforge.errors import UnknownNameError
    from edgeforge.verify.bench import bench

    with pytest.raises(UnknownNameError, match="local"):
        bench(stories_int4, runner="telnet")
