"""Peak host memory while loading a checkpoint, relative to its size.

    python benchmarks/measure_load_memory.py              # builds a ~1 GB fp16 Llama
    python benchmarks/measure_load_memory.py --model DIR  # an existing checkpoint

The load runs in a fresh subprocess: the peak resident set size (ru_maxrss)
after loading, minus the resident size just before it, over the checkpoint's
bytes on disk. Weights stream from the memory-mapped file into the model built
in place, one tensor at a time, so the ratio stays near 1.0 (the model
itself) rather than 2.0.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_LOAD = r"""
import json, resource, sys
import torch
from vllm.config import DeviceConfig, ModelConfig
from vllm.model_executor.model_loader import get_model
from vllm.transformers_utils.config import get_config
path = sys.argv[1]
config = ModelConfig(model=path, tokenizer=path, hf_config=get_config(path),
                     dtype=torch.float16, max_model_len=128)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = get_model(config, DeviceConfig(torch.device("cpu")))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"rss_before": before, "rss_peak": after,
                  "param_bytes": params}))
"""


def build_checkpoint(path: Path, hidden: int, layers: int) -> None:
    """A random fp16 Llama checkpoint written tensor by tensor."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000,
                         hidden_size=hidden,
                         intermediate_size=hidden * 4 - hidden // 4 * 4 // 3,
                         num_hidden_layers=layers,
                         num_attention_heads=16,
                         num_key_value_heads=8,
                         tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"],
                         dtype="float16")
    config.save_pretrained(path)
    shapes = {
        "model.embed_tokens.weight": (32000, hidden),
        "lm_head.weight": (32000, hidden),
        "model.norm.weight": (hidden, ),
    }
    kv = hidden // 16 * 8
    inter = config.intermediate_size
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden, ),
            p + "post_attention_layernorm.weight": (hidden, ),
        })
    tensors = {
        name: torch.randn(shape, dtype=torch.float16) * 0.02
        for name, shape in shapes.items()
    }
    save_file(tensors, str(path / "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="checkpoint folder (default: build)")
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--output-json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else Path(tmp)
        if not args.model:
            # built in a child process so that this one stays small
            subprocess.run([
                sys.executable, "-c",
                "import sys; sys.path.insert(0, sys.argv[1]); "
                "from measure_load_memory import build_checkpoint; "
                "from pathlib import Path; "
                "build_checkpoint(Path(sys.argv[2]), int(sys.argv[3]), "
                "int(sys.argv[4]))",
                str(Path(__file__).parent),
                str(path),
                str(args.hidden_size),
                str(args.num_layers)
            ],
                           check=True)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", _LOAD,
                              str(path)],
                             check=True,
                             capture_output=True,
                             text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    increase = result["rss_peak"] - result["rss_before"]
    result.update(checkpoint_bytes=size,
                  peak_increase=increase,
                  ratio=increase / size)
    print(f"checkpoint: {size / 1e9:.3f} GB on disk, parameters "
          f"{result['param_bytes'] / 1e9:.3f} GB")
    print(f"peak RSS increase while loading: {increase / 1e9:.3f} GB "
          f"= {result['ratio']:.2f}x the checkpoint")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
