"""The learning scripts step2_tensor_parallel.py, step2_kv_quantization.py and
step3_profiling.py of my_debug_scripts/ run on stories260K (CPU) and show
what they promise."""
import json
import re
from pathlib import Path

import pytest
import torch

from tests.debug_scripts.utils import load_script


def test_tensor_parallel_matches_unsharded(
        stories260k_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script("step2_tensor_parallel")
    # main raises AssertionError when a sharded layer differs
    script.main(["--model", str(stories260k_path), "--distributed"])
    out = capsys.readouterr().out
    assert "not supported yet" in out
    assert "MISMATCH" not in out
    # TP=2 and 4 shard whole layers, TP=8 attention (172 % 8 != 0)
    assert "TP=2 (decoder layer): 4 query heads and 2 kv head(s)" in out
    assert "TP=4 (decoder layer): 2 query heads and 1 kv head(s)" in out
    assert "TP=8 (attention only)" in out
    assert "replicated on 2 ranks" in out
    assert out.count("-> OK (atol") == 3
    for name, shape in (("self_attn.qkv_proj", "(64, 64)"), ("self_attn.o_proj",
                                                             "(64, 32)"),
                        ("mlp.gate_up_proj", "(172, 64)"), ("mlp.down_proj",
                                                            "(64, 86)")):
        assert re.search(
            rf"rank shard {re.escape(name)}\s+"
            rf"{re.escape(shape)}", out), name
    # hidden 64 fp32: 256 B per all-reduce, two per layer
    assert "256 B per all-reduce, 512 B per layer" in out
    assert "LlamaAttention.forward: output, _ = self.o_proj" in out
    assert "LlamaMLP.forward: x, _ = self.down_proj" in out
    assert "tensor_model_parallel_all_reduce(output)" in out
    assert out.count("gloo rank ") == 2


def test_tensor_parallel_helpers(stories260k_path: Path) -> None:
    """The check itself (not only its printout): per-layer differences."""
    script = load_script("step2_tensor_parallel")
    llm, model = script.load_engine_model(str(stories260k_path))
    ids = torch.tensor(llm.get_tokenizer().encode("Once upon a time"))
    check = script.check_world_size(model, model.config, ids, 2)
    assert check is not None and check.ok
    assert len(check.max_abs_diff) == model.config.num_hidden_layers
    assert check.shard_shapes["self_attn.qkv_proj"] == (64, 64)
    assert script.check_world_size(model, model.config, ids, 3) is None


def test_quantize_dequantize_bounds() -> None:
    script = load_script("step2_kv_quantization")
    x = torch.randn(50, 4, 8, generator=torch.Generator().manual_seed(0))
    for dtype, bound in (("fp8", 0.05), ("int8", 0.02)):
        for granularity in ("tensor", "head"):
            scale = script.compute_scale(x, dtype, granularity)
            err = script.relative_error(
                script.quantize_dequantize(x, dtype, scale), x)
            assert 0 < err < bound, (dtype, granularity, err)
    assert script.compute_scale(x, "fp8", "head").shape == (1, 4, 1)


def test_kv_quantization(stories260k_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script("step2_kv_quantization")
    script.main(["--model", str(stories260k_path), "--max-tokens", "16"])
    out = capsys.readouterr().out
    assert 'kv_cache_dtype="fp8" is not supported by this engine yet' in out
    diff = float(
        re.search(r"vs the engine's \(unquantized\): max abs diff "
                  r"(\S+)", out).group(1))  # type: ignore[union-attr]
    assert diff < 1e-5  # plain attention reproduces the engine's
    rows = re.findall(
        r"^(fp8|int8)/(tensor|head)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)"
        r"\s+(\S+)$", out, re.M)
    assert len(rows) == 4 * 5  # 4 schemes x 5 layers
    for dtype, _, _, k_rel, v_rel, _, _, attn_rel in rows:
        bound = 0.06 if dtype == "fp8" else 0.03
        assert 0 < float(k_rel) < bound and 0 < float(v_rel) < bound
        assert float(attn_rel) < 0.5
    assert "fp8/int8: 320 B" in out and "saves 75%" in out
    forced = re.findall(r"teacher forced\s+(\d+)/(\d+)", out)
    assert len(forced) == 4
    for same, total in forced:
        assert int(same) >= 0.8 * int(total)


def test_profiling(stories260k_path: Path, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script("step3_profiling")
    trace = tmp_path / "sub" / "trace.json"
    report = script.run([
        "--model",
        str(stories260k_path), "--num-prompts", "2", "--max-tokens", "4",
        "--trace",
        str(trace)
    ])
    out = capsys.readouterr().out
    assert trace.is_file() and report.trace_path == trace
    assert "traceEvents" in json.loads(trace.read_text())
    assert "aten::mm" in {name for name, _, _ in report.top_ops}
    assert "aten::mm" in out and f"Chrome trace written to {trace}" in out
    assert any("llm_engine.py" in where
               for where, _ in report.top_host_functions)
    assert "vllm/entrypoints/llm.py" in out
    assert report.num_generated_tokens == 2 * 4
    assert out.count("TTFT") == 2
    assert "benchmarks/profile_decode_step.py" in out


def test_profiler_dir_env(monkeypatch: pytest.MonkeyPatch,
                          tmp_path: Path) -> None:
    script = load_script("step3_profiling")
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path))
    assert script.default_trace_path().parent == tmp_path
    monkeypatch.delenv("VLLM_TORCH_PROFILER_DIR")
    assert script.default_trace_path().parent == script.LOG_DIR
