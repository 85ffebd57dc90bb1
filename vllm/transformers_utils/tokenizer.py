"""Loading Hugging Face tokenizers and encoding prompts."""
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vllm.transformers_utils.config import looks_like_local_path

AnyTokenizer = PreTrainedTokenizerBase

_TOKENIZER_MODES = ("auto", "slow")


def get_tokenizer(tokenizer_name: str,
                  *,
                  tokenizer_mode: str = "auto",
                  trust_remote_code: bool = False,
                  revision: str | None = None) -> AnyTokenizer:
    """Load a tokenizer from a local directory or the Hugging Face Hub.

    ``tokenizer_mode`` "auto" picks the fast (Rust) tokenizer when there is
    one; "slow" asks for the Python one. Nothing is cached: each call loads
    a new tokenizer. Raises ValueError when it cannot be loaded.
    """
    if tokenizer_mode not in _TOKENIZER_MODES:
        raise ValueError(f"Unknown tokenizer_mode '{tokenizer_mode}': "
                         f"expected one of {', '.join(_TOKENIZER_MODES)}.")
    if trust_remote_code:
        raise ValueError("trust_remote_code=True is not supported: this engine "
                         "does not run remote code from model repositories.")
    if not os.path.isdir(tokenizer_name) and (
            os.path.exists(tokenizer_name)
            or looks_like_local_path(tokenizer_name)):
        raise ValueError(f"Tokenizer path '{tokenizer_name}' is not a "
                         "directory.")
    try:
        return AutoTokenizer.from_pretrained(tokenizer_name,
                                             use_fast=tokenizer_mode == "auto",
                                             revision=revision,
                                             trust_remote_code=False)
    except Exception as err:
        # Missing files, hub failures and unsupported tokenizer classes all
        # end here; name the tokenizer so the user knows which one failed.
        raise ValueError(
            f"Could not load tokenizer '{tokenizer_name}' ({err}). Pass a "
            "local directory with the tokenizer files, or check the name and "
            "your network / HF_HUB_OFFLINE.") from err


def encode_prompt(tokenizer: AnyTokenizer, text: str) -> list[int]:
    """Token ids of ``text``, with the tokenizer's default special tokens.

    Llama tokenizers add BOS here, as Hugging Face generation does.
    """
    return tokenizer.encode(text)
