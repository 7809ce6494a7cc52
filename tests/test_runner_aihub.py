"""The ``aihub`` runner without an AI Hub account: ``edgeforge devices`` says in one line what is missing (the token,
or the qai-hub client, which is not installed here), a recorded profile result (tests/data/aihub/, built with the
client's own converter: see its README) becomes a HubProfile with every inference time, and only ONNX is taken."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeforge.cli import main
from edgeforge.errors import ConfigError, InputError, UnsupportedError
from edgeforge.runners.aihub import HubProfile, onnx_graph, parse_profile, profile_on_hub
from edgeforge.runners.farm import load_farm, runner_for

PROFILE = Path(__file__).parent / "data" / "aihub" / "profile.json"
HUB_DEVICE = "Samsung Galaxy S24 (Family)"


@pytest.fixture
def farm(tmp_path, monkeypatch):
    """A farm with one aihub device, and no credentials anywhere (no token variable, the client's config file
    pointed at a file that does not exist)."""
    monkeypatch.delenv("QAI_HUB_API_TOKEN", raising=False)
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "client.ini"))
    path = tmp_path / "farm.toml"
    path.write_text(f'[[device]]\nname = "s24"\nkind = "aihub"\ndevice = "{HUB_DEVICE}"\n'
                    'options = "--compute_unit cpu"\nlabels = { os = "android" }\n')
    return path


def _devices(farm, *extra):
    return CliRunner().invoke(main, ["devices", "--farm", str(farm), *extra], catch_exceptions=False)


def test_devices_without_a_token_says_how_to_configure_it(farm, tmp_path):
    result = _devices(farm)
    assert result.exit_code == 0, result.output + result.stderr
    row = result.stdout.splitlines()[1]
    assert row.split()[:5] == ["s24", "aihub", "os=android", "NOT", "READY:"], row
    assert row.endswith(f"NOT READY: device 's24' (AI Hub '{HUB_DEVICE}'): no AI Hub API token: set "
                        f"QAI_HUB_API_TOKEN, or run `qai-hub configure --api_token TOKEN` (it writes "
                        f"{tmp_path / 'client.ini'})"), row
    strict = _devices(farm, "--strict")
    assert strict.exit_code == 3 and strict.stderr == f"edgeforge: error: {farm}: not reachable or not checked: s24\n"


@pytest.mark.parametrize("where", ["environment", "config file"])
def test_devices_without_the_client_says_how_to_install_it(farm, tmp_path, monkeypatch, where):
    if importlib.util.find_spec("qai_hub") is not None:
        pytest.skip("qai-hub is installed here: the missing-client line cannot be shown")
    secret = "tok-0123456789abcdef"
    if where == "environment":
        monkeypatch.setenv("QAI_HUB_API_TOKEN", secret)
    else:
        (tmp_path / "client.ini").write_text(f"[api]\napi_token = {secret}\napi_url = https://app.aihub.qualcomm.com\n"
                                             "web_url = https://app.aihub.qualcomm.com\n")
    result = _devices(farm, "--json", str(tmp_path / "devices.json"))
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stdout.splitlines()[1].endswith(
        f"NOT READY: device 's24' (AI Hub '{HUB_DEVICE}'): the qai-hub client is not installed: "
        "pip install 'edgeforge[aihub]'"), result.stdout
    written = (tmp_path / "devices.json").read_text()
    assert secret not in result.output + result.stderr + written, "the token is never shown or written"
    assert json.loads(written)["devices"][0]["device"]["connection"] == {"device": HUB_DEVICE,
                                                                         "options": "--compute_unit cpu"}


def test_recorded_profile_keeps_every_inference_time_in_seconds():
    data = json.loads(PROFILE.read_text())
    profile = parse_profile(data, device=HUB_DEVICE, job_id="jabc123", path=PROFILE)
    microseconds = data["execution_summary"]["all_inference_times"]
    assert len(profile.inference_s) == len(microseconds) == 100
    assert profile.inference_s == [t / 1e6 for t in microseconds], "every sample, in order, not only the summary"
    assert profile.estimated_inference_s == 1843e-6 == statistics.median_high(microseconds) / 1e6, "the hub's summary"
    assert (profile.first_load_s, profile.warm_load_s, profile.compile_s) == (0.412345, 0.098765, 0.0)
    assert profile.inference_peak_memory_bytes == [21_000_000, 23_500_000]
    assert profile.compute_units == {"CPU": 16}
    assert "no KV-cache decode loop" in profile.timed
    assert HubProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile, "bit-exact round trip"


def test_a_profile_without_per_inference_times_is_refused_in_one_line():
    data = json.loads(PROFILE.read_text())
    del data["execution_summary"]["all_inference_times"]
    with pytest.raises(InputError) as refused:
        parse_profile(data, device=HUB_DEVICE, path=PROFILE)
    assert str(refused.value) == f"{PROFILE}: the profile has no all_inference_times (profile detail older than " \
                                 "1.2?): only the summary figure, which is not a set of samples"


def test_only_an_onnx_graph_goes_to_the_hub(farm, tmp_path):
    pte = tmp_path / "stories.pte.d"
    pte.mkdir()
    (pte / "model.pte").write_bytes(b"PTE")
    (pte / "tokenizer.model").write_bytes(b"tok")
    runner = runner_for(load_farm(farm).devices[0])
    with pytest.raises(ConfigError) as refused:
        profile_on_hub(runner, pte)
    assert str(refused.value) == f"{pte}: the aihub runner profiles ONNX artifacts only (a folder with one .onnx " \
                                 "graph), this holds .model, .pte: export with --format onnx"
    onnx = tmp_path / "stories.onnx.d"
    onnx.mkdir()
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"):
        (onnx / name).write_bytes(b"x")
    assert onnx_graph(onnx) == [onnx / "model.onnx", onnx / "model.onnx.data"], "the graph and its data, no more"


def test_bench_on_the_hub_is_refused_saying_what_a_profile_job_times(farm, tmp_path):
    from edgeforge.checkpoints import DEFAULT_CHECKPOINT

    result = CliRunner().invoke(main, ["bench", str(DEFAULT_CHECKPOINT), "--farm", str(farm), "-o",
                                       str(tmp_path / "runs"), "-r", "1", "--prompt-lengths", "4"],
                                catch_exceptions=False)
    assert result.exit_code == 3, result.output + result.stderr
    assert f"FAILED s24 after 1 attempt(s), 1 job(s) not run: device 's24' (AI Hub '{HUB_DEVICE}'): bench's " \
           "prefill/decode tests cannot run on AI Hub (a profile job times whole inferences on inputs the hub " \
           "generates, with no KV-cache loop): use edgeforge.runners.aihub.profile_on_hub" in result.stdout
    with pytest.raises(UnsupportedError):
        runner_for(load_farm(farm).devices[0]).environment(threads=None)
