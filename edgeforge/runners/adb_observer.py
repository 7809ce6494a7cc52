"""What the ``adb`` runner says to a phone and reads back, as pure functions of text (tested against recorded output
in tests/data/adb/):

    flags = runner_flags(help_text)              # `llama_main --help` (gflags): flag name -> type
    argv = runner_command(flags, binary=..., model=..., tokenizer=..., prompt="...", prompt_tokens=16,
                          decode_tokens=32, threads=4, cores=[4, 5, 6, 7])
    observation = parse_observer(stdout)         # the `PyTorchObserver {...}` line ExecuTorch's LLM runner prints
    facts = parse_facts(shell_output)            # FACTS_SCRIPT's output: rooted, cpufreq, thermal, battery, screen

The observer's fields are those of ExecuTorch's ``extension/llm/runner/stats.h`` (the same in v0.4.0 and v1.4.0;
v1.4.0 adds ``prefill_token_per_sec``/``decode_token_per_sec``, which are ignored: the timestamps are kept).
Both releases' runners (``examples/models/llama2/runner/runner.cpp`` in v0.4.0, ``extension/llm/runner/
text_llm_runner.cpp`` in v1.4.0) take ``inference_start_ms`` before encoding the prompt, ``prompt_eval_end_ms``
after the prefill forward and the first token's sampling, and count in ``generated_tokens`` the single-token
decode forwards between ``prompt_eval_end_ms`` and ``inference_end_ms`` (not the token the prefill produced).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edgeforge.errors import ConfigError, RuntimeFailure
from edgeforge.runners import LoadFacts, Samples
from edgeforge.verify.machine import cpu_model

OBSERVER_PREFIX = "PyTorchObserver "
OBSERVER_FIELDS = ("prompt_tokens", "generated_tokens", "model_load_start_ms", "model_load_end_ms",
                   "inference_start_ms", "prompt_eval_end_ms", "first_token_ms", "inference_end_ms",
                   "aggregate_sampling_time_ms", "SCALING_FACTOR_UNITS_PER_SECOND")
REQUIRED_FLAGS = ("model_path", "tokenizer_path", "prompt", "temperature")
_FLAG_START = re.compile(r"^ {4}--?(\w+) \(")  # gflags' DescribeOneFlag: "    -name (description)"
_FLAG_TYPE = re.compile(r"\)\s+type: (\w+)\s+default: ")


def runner_flags(help_text: str) -> dict[str, str]:
    """The flags a gflags binary's ``--help`` lists (name -> type), its wrapped continuation lines joined."""
    entries: list[list[str]] = []
    for line in help_text.splitlines():
        if _FLAG_START.match(line):
            entries.append([line.strip()])
        elif entries and line.startswith(" " * 6) and line.strip():
            entries[-1].append(line.strip())
    flags = {}
    for entry in entries:
        text = " ".join(entry)
        found = _FLAG_TYPE.search(text)
        if found:
            flags[_FLAG_START.match("    " + text).group(1)] = found.group(1)
    return flags


def runner_command(flags: dict[str, str], *, binary: str, model: str, tokenizer: str, prompt: str,
                   prompt_tokens: int, decode_tokens: int, threads: int, cores: list[int]) -> list[str]:
    """The shell words of one greedy run of ExecuTorch's LLM runner: ``prompt`` (``prompt_tokens`` tokens once
    encoded) prefilled, then ``decode_tokens`` decode forwards, pinned to ``cores`` with ``taskset``, with the
    flags this release has (``max_new_tokens`` where present, else ``seq_len``; ``ignore_eos``, ``warmup``,
    ``num_bos``/``num_eos`` where present)."""
    missing = [name for name in REQUIRED_FLAGS if name not in flags]
    if missing:
        raise ConfigError(f"the runner binary {binary} has no --{', --'.join(missing)} flag(s): not ExecuTorch's "
                          f"LLM runner (its --help lists {', '.join(sorted(flags)) or 'no flags'})")
    words = ["taskset", cpu_mask_hex(cores), binary, f"--model_path={model}", f"--tokenizer_path={tokenizer}",
             f"--prompt={prompt}", "--temperature=0"]
    if "max_new_tokens" in flags:  # v1.x: the prefill's token counts as the first new token
        words.append(f"--max_new_tokens={decode_tokens + 1}")
    elif "seq_len" in flags:  # v0.4: decode runs while pos < seq_len - 1 from pos = prompt tokens (+1: a BOS from
        words.append(f"--seq_len={prompt_tokens + 1 + decode_tokens + 1}")  # the model's get_n_bos, default 1)
    else:
        raise ConfigError(f"the runner binary {binary} has neither --max_new_tokens nor --seq_len")
    if "cpu_threads" in flags:
        words.append(f"--cpu_threads={threads}")
    optional = {"ignore_eos": "true", "warmup": "true", "num_bos": "0", "num_eos": "0"}
    words += [f"--{name}={value}" for name, value in optional.items() if name in flags]
    return words


def cpu_mask_hex(cores: list[int]) -> str:
    """``taskset``'s hexadecimal CPU mask of ``cores``."""
    return format(sum(1 << core for core in set(cores)), "x")


@dataclass(frozen=True)
class Observation:
    """One run's ``PyTorchObserver`` statistics (timestamps in 1 / ``units_per_second`` seconds)."""

    prompt_tokens: int
    generated_tokens: int
    model_load_start_ms: int
    model_load_end_ms: int
    inference_start_ms: int
    prompt_eval_end_ms: int
    first_token_ms: int
    inference_end_ms: int
    aggregate_sampling_time_ms: int
    units_per_second: int

    @property
    def load_s(self) -> float:
        return (self.model_load_end_ms - self.model_load_start_ms) / self.units_per_second

    @property
    def prefill_s(self) -> float:
        """Prompt encoding + prefill forward + the first token's sampling (bench's TTFT, with the encoding)."""
        return (self.prompt_eval_end_ms - self.inference_start_ms) / self.units_per_second

    @property
    def decode_s(self) -> float:
        """The ``generated_tokens`` single-token decode forwards together."""
        return (self.inference_end_ms - self.prompt_eval_end_ms) / self.units_per_second


def parse_observer(stdout: str, *, stderr: str = "", binary: str = "the runner") -> Observation:
    """The last ``PyTorchObserver {...}`` line of ``stdout``; RuntimeFailure (with stderr's last line) if there is
    none or it lacks a field."""
    lines = [line for line in stdout.splitlines() if line.startswith(OBSERVER_PREFIX)]
    if not lines:
        raise RuntimeFailure(f"{binary} printed no {OBSERVER_PREFIX.strip()} line: {last_line(stderr)}")
    try:
        stats = json.loads(lines[-1][len(OBSERVER_PREFIX):])
        values = [int(stats[name]) for name in OBSERVER_FIELDS]
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeFailure(f"{binary}'s {OBSERVER_PREFIX.strip()} line is not the statistics JSON "
                             f"ExecuTorch's runner prints ({type(exc).__name__}: {exc}): {lines[-1][:200]}") from None
    if values[-1] <= 0:
        raise RuntimeFailure(f"{binary}'s {OBSERVER_PREFIX.strip()} line has SCALING_FACTOR_UNITS_PER_SECOND "
                             f"{values[-1]}")
    return Observation(*values)


def run_samples(prefills: list[Observation], decode: Observation, decode_tokens: int) -> Samples:
    """A round's Samples from its runs: each prompt's prefill, and ``decode_tokens`` decode forwards timed in
    ``decode`` (scaled to that count where the run made more or fewer: tokens/s stays what was observed)."""
    if decode.generated_tokens < 1:
        raise RuntimeFailure("the runner decoded no token after the prefill (an end-of-sequence at once?)")
    return Samples(prefill_s=[run.prefill_s for run in prefills],
                   decode_s=decode.decode_s * decode_tokens / decode.generated_tokens)


def load_facts(observation: Observation, stderr: str, *, threads_note: str) -> LoadFacts:
    """The model's load time from a run; a binary has no import stage (0) and logs its RSS after load."""
    return LoadFacts(import_s=0.0, load_s=observation.load_s, rss_after_import_bytes=0,
                     rss_after_load_bytes=peak_rss_bytes(stderr, after="loading model"), threads_note=threads_note)


def peak_rss_bytes(stderr: str, *, after: str = r"[\w ]+") -> int:
    """The largest ``RSS after <after>: X MiB`` the runner logged (0 where it logged none, or "0 if unsupported")."""
    values = re.findall(rf"RSS after {after}: ([0-9.]+) MiB", stderr)
    return int(max(map(float, values), default=0.0) * 2**20)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output on stderr"


# ---- the phone's facts and conditions ----

SECTION = "@@edgeforge:"
CPUFREQ = "/sys/devices/system/cpu/cpufreq/policy*"
THERMAL = "/sys/class/thermal/thermal_zone*"
FACTS_COMMANDS = {  # one `adb shell` round trip; each section's output starts after its marker line
    "id": "id",
    "su": "timeout 5 su -c id </dev/null 2>&1",
    "props": "getprop",
    "cpus": "cat /sys/devices/system/cpu/possible",
    "cpuinfo": "grep -E '^(Hardware|model name|CPU implementer|CPU part)' /proc/cpuinfo",
    "meminfo": "grep MemTotal /proc/meminfo",
    "loadavg": "cat /proc/loadavg",
    "kernel": "uname -r",
    "cpufreq": f"grep -H . {CPUFREQ}/related_cpus {CPUFREQ}/scaling_governor {CPUFREQ}/scaling_cur_freq "
               f"{CPUFREQ}/cpuinfo_max_freq 2>/dev/null",
    "time_in_state": f"grep -H . {CPUFREQ}/stats/time_in_state 2>/dev/null",
    "thermal": f"grep -H . {THERMAL}/type {THERMAL}/temp 2>/dev/null",
    "battery": "dumpsys battery",
    "power": "dumpsys power | grep -E 'mWakefulness=|Display Power'",
}
FACTS_SCRIPT = "; ".join(f"echo {SECTION}{name}; {command}" for name, command in FACTS_COMMANDS.items())
CONDITIONS_SCRIPT = "; ".join(f"echo {SECTION}{name}; {FACTS_COMMANDS[name]}"
                              for name in ("loadavg", "cpufreq", "thermal"))  # read around every sample
PROPS = ("ro.product.manufacturer", "ro.product.model", "ro.soc.model", "ro.hardware", "ro.build.version.release",
         "ro.build.version.sdk", "ro.build.fingerprint")


def parse_facts(output: str) -> dict:
    """FACTS_SCRIPT's output as the runner records it: rooted or not, chosen properties, CPU count, cpufreq per
    policy (CPUs, governor, current and maximum kHz), time_in_state per policy (kHz -> 10 ms ticks), thermal
    zones (type, °C; null where unreadable), battery and screen state, memory, load and kernel."""
    sections = _sections(output)
    props = dict(re.findall(r"^\[([^\]]+)\]: \[(.*)\]$", sections.get("props", ""), re.M))
    uid = _uid(sections.get("id", ""))
    return {"uid": uid, "rooted": uid == 0 or _uid(sections.get("su", "")) == 0,
            "props": {key: props[key] for key in PROPS if props.get(key)},
            "cpus": len(cpu_list(sections.get("cpus", ""))),
            "cpu_model": cpu_model(sections.get("cpuinfo", "")),
            "memory_total_bytes": _first_int(sections.get("meminfo", ""), scale=1024),
            "load_average_1m": float((sections.get("loadavg", "").split() or ["0"])[0]),
            "kernel": sections.get("kernel", "").strip(),
            "cpufreq": cpufreq_policies(sections.get("cpufreq", "")),
            "time_in_state": time_in_state(sections.get("time_in_state", "")),
            "thermal": thermal_zones(sections.get("thermal", "")),
            "battery": battery(sections.get("battery", "")),
            "screen": screen(sections.get("power", ""))}


def parse_conditions(output: str, *, time_s: float) -> dict:
    """CONDITIONS_SCRIPT's output as ``edgeforge.runners.conditions.Conditions``' fields (readable zones only)."""
    sections = _sections(output)
    zones = thermal_zones(sections.get("thermal", ""))
    readable = [{"zone": zone["zone"], "type": zone["type"], "celsius": zone["temp_c"]}
                for zone in zones if zone["temp_c"] is not None]
    policies = cpufreq_policies(sections.get("cpufreq", ""))
    governors = {name: policy["governor"] for name, policy in policies.items() if "governor" in policy}
    frequencies = {name: policy["cur_khz"] for name, policy in policies.items() if "cur_khz" in policy}
    return {"time_s": time_s, "temperatures": readable,
            "hottest_c": max((zone["celsius"] for zone in readable), default=None),
            "temperature_note": None if readable else (
                f"{len(zones)} thermal zone(s), none readable by the shell user (a rooted phone reads them)"
                if zones else "the phone lists no thermal zones"),
            "governors": governors, "frequencies_khz": frequencies,
            "cpufreq_note": None if governors or frequencies else "no cpufreq policy readable by the shell user",
            "load_average": [float(value) for value in sections.get("loadavg", "").split()[:3]]}


def cpu_list(text: str) -> list[int]:
    """A sysfs CPU list ("0-3,6") as ids; "0 1 2 3" (related_cpus) too."""
    cpus: list[int] = []
    for part in re.split(r"[,\s]+", text.strip()):
        low, dash, high = part.partition("-")
        if low.isdigit():
            cpus += range(int(low), int(high) + 1) if dash and high.isdigit() else [int(low)]
    return cpus


def cpufreq_policies(text: str) -> dict[str, dict]:
    """``grep -H`` over policy*/{related_cpus,scaling_governor,scaling_cur_freq,cpuinfo_max_freq}."""
    policies: dict[str, dict] = {}
    for path, value in _grep_lines(text):
        match = re.search(r"/(policy\d+)/(\w+)$", path)
        if not match:
            continue
        policy, name = policies.setdefault(match.group(1), {}), match.group(2)
        if name == "related_cpus":
            policy["cpus"] = cpu_list(value)
        elif name == "scaling_governor":
            policy["governor"] = value
        else:
            policy["cur_khz" if name == "scaling_cur_freq" else "max_khz"] = int(value)
    return dict(sorted(policies.items(), key=lambda item: int(item[0].removeprefix("policy"))))


def time_in_state(text: str) -> dict[str, dict[str, int]]:
    """``grep -H`` over policy*/stats/time_in_state: policy -> {kHz: time in 10 ms units}."""
    states: dict[str, dict[str, int]] = {}
    for path, value in _grep_lines(text):
        match = re.search(r"/(policy\d+)/stats/time_in_state$", path)
        parts = value.split()
        if match and len(parts) == 2 and all(part.isdigit() for part in parts):
            states.setdefault(match.group(1), {})[parts[0]] = int(parts[1])
    return states


def thermal_zones(text: str) -> list[dict]:
    """``grep -H`` over thermal_zone*/{type,temp}: each zone's type and °C (temp is millidegrees; null where the
    file was not readable)."""
    zones: dict[str, dict] = {}
    for path, value in _grep_lines(text):
        match = re.search(r"/(thermal_zone\d+)/(type|temp)$", path)
        if not match:
            continue
        zone = zones.setdefault(match.group(1), {"zone": match.group(1), "type": None, "temp_c": None})
        if match.group(2) == "type":
            zone["type"] = value
        elif re.fullmatch(r"-?\d+", value):
            zone["temp_c"] = int(value) / 1000
    return sorted(zones.values(), key=lambda zone: int(zone["zone"].removeprefix("thermal_zone")))


def battery(text: str) -> dict:
    """``dumpsys battery``: level (%), temperature (°C; dumpsys gives tenths), status code, what powers it."""
    fields = dict(re.findall(r"^\s*([\w ]+): (.*)$", text, re.M))
    powered = [name.removesuffix(" powered") for name, value in fields.items()
               if name.endswith(" powered") and value.strip() == "true"]
    temperature = fields.get("temperature", "").strip()
    return {"level": int(fields["level"]) if fields.get("level", "").strip().isdigit() else None,
            "temperature_c": int(temperature) / 10 if re.fullmatch(r"-?\d+", temperature) else None,
            "status": fields.get("status", "").strip() or None, "powered": powered}


def screen(text: str) -> dict:
    """``dumpsys power``'s mWakefulness (Awake, Asleep, Dozing) and display power state (ON, OFF, DOZE)."""
    wakefulness = re.search(r"mWakefulness=(\w+)", text)
    display = re.search(r"Display Power: state=(\w+)", text)
    return {"wakefulness": wakefulness and wakefulness.group(1), "display": display and display.group(1)}


def _sections(output: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith(SECTION):
            current = sections.setdefault(line[len(SECTION):].strip(), [])
        elif current is not None:
            current.append(line.rstrip("\r"))
    return {name: "\n".join(lines) for name, lines in sections.items()}


def _grep_lines(text: str) -> list[tuple[str, str]]:
    """``grep -H .`` output: (path, value) per line."""
    return [(path, value.strip()) for path, sep, value in (line.partition(":") for line in text.splitlines()) if sep]


def _uid(text: str) -> int | None:
    found = re.search(r"\buid=(\d+)", text)
    return int(found.group(1)) if found else None


def _first_int(text: str, *, scale: int) -> int | None:
    found = re.search(r"\d+", text)
    return int(found.group()) * scale if found else None
