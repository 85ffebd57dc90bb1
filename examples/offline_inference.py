"""Offline generation with the LLM class.

    python examples/offline_inference.py                      # stories260K
    python examples/offline_inference.py --model PATH_OR_HUB_ID --temperature 0.8
"""
import argparse
from pathlib import Path

from vllm import LLM, SamplingParams

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / \
    "models" / "stories260K"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=60)
    args = parser.parse_args()

    prompts = [
        "Once upon a time",
        "The little dog",
        "Lily wanted to",
    ]
    llm = LLM(model=args.model)
    params = SamplingParams(temperature=args.temperature,
                            max_tokens=args.max_tokens)
    for output in llm.generate(prompts, params):
        completion = output.outputs[0]
        print(f"\nPrompt: {output.prompt!r}\nGenerated: {completion.text!r}"
              f"\n({len(completion.token_ids)} tokens, "
              f"finish_reason={completion.finish_reason})")


if __name__ == "__main__":
    main()
