"""Loading model configs and files, from a local directory or the HF Hub."""
import os
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from vllm.logger import init_logger

logger = init_logger(__name__)

_GENERATION_CONFIG_FILE = "generation_config.json"


def _reject_remote_code(trust_remote_code: bool) -> None:
    if trust_remote_code:
        raise ValueError("trust_remote_code=True is not supported: this engine "
                         "does not run remote code from model repositories.")


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only be a filesystem path, not a Hub id."""
    # Hub ids are "name" or "org/name"; anything else can only be a path.
    return (os.path.isabs(name) or name.startswith(("./", "../", "~"))
            or name.count("/") > 1)


def _check_local_path(model: str) -> bool:
    """True if ``model`` is a local directory; raise if it is a bad path."""
    if os.path.isdir(model):
        return True
    if os.path.exists(model):
        raise ValueError(f"Model path '{model}' is a file, not a directory: "
                         "pass the directory that holds config.json.")
    if looks_like_local_path(model):
        raise ValueError(f"Model directory '{model}' does not exist.")
    return False


def hub_error(model: str, err: BaseException) -> ValueError:
    """The error to raise when the Hub could not provide ``model``."""
    return ValueError(
        f"Could not load model '{model}': it is not a local directory and "
        f"the Hugging Face Hub could not provide it ({err}). Pass a local "
        "path, or check the name and your network / HF_HUB_OFFLINE.")


def get_config(model: str,
               *,
               revision: str | None = None,
               trust_remote_code: bool = False) -> PretrainedConfig:
    """Load the Hugging Face config of ``model`` (local directory or Hub id).

    Raises ValueError with a clear message when the model cannot be found.
    """
    _reject_remote_code(trust_remote_code)
    if _check_local_path(model):
        config_file = os.path.join(model, "config.json")
        if not os.path.isfile(config_file):
            raise ValueError(f"Model directory '{model}' has no config.json.")
        return AutoConfig.from_pretrained(model,
                                          revision=revision,
                                          trust_remote_code=False)
    try:
        return AutoConfig.from_pretrained(model,
                                          revision=revision,
                                          trust_remote_code=False)
    except OSError as err:
        # transformers turns every hub failure (offline, no such repo,
        # network error, invalid name) into an OSError.
        raise hub_error(model, err) from err


def _is_missing_file_error(err: BaseException) -> bool:
    # A file missing from the cache (offline) or from the repo surfaces as
    # huggingface_hub's EntryNotFoundError somewhere in the chain, except
    # when transformers raises its own OSError, without a cause.
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (EntryNotFoundError, FileNotFoundError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return "does not appear to have a file named" in str(err)


def get_generation_config(model: str,
                          revision: str | None = None) -> dict[str, Any]:
    """The model's generation_config.json as a dict, or {} when it has none.

    Only the values the file sets are returned (e.g. ``eos_token_id``), not
    transformers' defaults nor its bookkeeping keys.
    """
    if os.path.isdir(model) and not os.path.isfile(
            os.path.join(model, _GENERATION_CONFIG_FILE)):
        logger.debug("%s has no %s", model, _GENERATION_CONFIG_FILE)
        return {}
    try:
        config = GenerationConfig.from_pretrained(model,
                                                  revision=revision or "main")
    except OSError as err:
        if os.path.isdir(model) or not _is_missing_file_error(err):
            raise
        logger.debug("No %s for %s: %s", _GENERATION_CONFIG_FILE, model, err)
        return {}
    values = config.to_diff_dict()
    return {
        key: value
        for key, value in values.items()
        if not key.startswith("_") and key != "transformers_version"
    }


def get_model_path(model: str, revision: str | None,
                   allow_patterns: list[str]) -> str:
    """A local directory holding the model's files matching allow_patterns.

    A local directory is returned as is; a Hub id is downloaded (only the
    files matching ``allow_patterns``) into, or found in, the HF cache.
    """
    if _check_local_path(model):
        return model
    try:
        return snapshot_download(model,
                                 revision=revision,
                                 allow_patterns=allow_patterns)
    except Exception as err:
        # Offline, unknown repo, bad name or network failure: all mean the
        # hub cannot provide the files.
        raise hub_error(model, err) from err
