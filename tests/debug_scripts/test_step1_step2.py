"""The learning scripts of my_debug_scripts/ (steps 1 and 2) run on
stories260K and print what they promise; .vscode/launch.json is valid."""
import json
from pathlib import Path

import pytest

from tests.debug_scripts.utils import load_script

REPO = Path(__file__).resolve().parents[2]


def test_step1_basic_llama(stories260k_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script("step1_basic_llama")
    script.main(["--model", str(stories260k_path), "--max-tokens", "8"])
    out = capsys.readouterr().out
    for prompt in script.PROMPTS:
        assert f"Prompt: {prompt!r}" in out
    assert out.count("Generated: ") == len(script.PROMPTS)
    assert out.count("(8 tokens, finish_reason=length)") == len(script.PROMPTS)


def test_step1_debugger_protection(tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script("step1_basic_llama")
    log_file = tmp_path / "step1.debug.log"
    monkeypatch.setattr(script, "LOG_DIR", tmp_path)
    monkeypatch.setattr(script, "LOG_FILE", log_file)
    logger = script.make_logger(debugging=True)
    logger.info("hello from the debugger")
    for handler in logger.handlers:
        handler.flush()
    assert "hello from the debugger" in log_file.read_text()
    # pytest itself installs no trace function; debugpy/pydevd are absent.
    monkeypatch.setattr(script.sys, "gettrace", lambda: print)
    assert script.debugger_attached()


def test_step2_paged_attention(stories260k_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    load_script("step2_paged_attention").main(
        ["--model", str(stories260k_path), "--max-tokens", "4"])
    out = capsys.readouterr().out
    assert "kv_caches[0].shape = (2, " in out
    assert "slot mapping of A" in out
    assert "copy-on-write (src block, dst block)" in out  # n=2 fork
    assert "[2]" in out  # a block shared by two sequences
    assert "paged vs dense attention: OK" in out


def test_step2_continuous_batching(stories260k_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    load_script("step2_continuous_batching").main(
        ["--model", str(stories260k_path)])
    out = capsys.readouterr().out
    assert "MIXED" in out  # decodes and prefill chunks in one step
    assert "prefill chunk" in out  # chunked prefill
    assert "reuses blocks" in out  # freed blocks handed out again
    assert "preempted 1 request(s)" in out
    assert "recompute chunk" in out
    for rid in ("r0", "r1", "r2", "r3", "r4"):
        assert f"{rid} finished (length)" in out


def test_launch_json_programs_exist() -> None:
    config = json.loads((REPO / ".vscode" / "launch.json").read_text())
    programs = []
    for entry in config["configurations"]:
        assert entry["justMyCode"] is False, entry["name"]
        assert entry["subProcess"] is True, entry["name"]
        assert entry["steppingResumesAllThreads"] is True, entry["name"]
        assert entry["env"]["VLLM_LOGGING_LEVEL"] == "DEBUG", entry["name"]
        assert ("program" in entry) != ("module" in entry), entry["name"]
        if "program" in entry:
            programs.append(entry["program"])
    assert len(programs) >= 6
    names = {Path(p).name for p in programs}
    for script in ("step1_basic_llama.py", "step2_paged_attention.py",
                   "step2_continuous_batching.py", "step2_tensor_parallel.py",
                   "step2_kv_quantization.py", "step3_profiling.py"):
        assert script in names
    for program in programs:
        path = Path(program.replace("${workspaceFolder}", str(REPO)))
        if not path.is_file():
            pytest.fail(f"launch.json names a missing program: {program}")
