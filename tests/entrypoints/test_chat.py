"""LLM.chat renders conversations exactly as the tokenizer's template does."""
import json
import shutil
from pathlib import Path

import pytest

from vllm import LLM, SamplingParams

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>: "
            "{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>:{% endif %}")


@pytest.fixture(scope="module")
def chat_model(stories260k_path: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "stories-chat"
    shutil.copytree(stories260k_path, path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE
    config_path.write_text(json.dumps(config))
    return path


def test_chat_renders_like_apply_chat_template(chat_model: Path) -> None:
    llm = LLM(str(chat_model), device="cpu")
    tokenizer = llm.get_tokenizer()
    conversation = [{"role": "user", "content": "Tell me a story."}]
    params = SamplingParams(temperature=0, max_tokens=8)
    out = llm.chat(conversation, params, use_tqdm=False)[0]
    expected = tokenizer.apply_chat_template(conversation,
                                             tokenize=False,
                                             add_generation_prompt=True)
    assert out.prompt == expected
    assert out.prompt_token_ids == tokenizer.apply_chat_template(
        conversation,
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True)["input_ids"]
    assert len(out.outputs[0].token_ids) == 8
    # a batch of conversations, and the template passed in explicitly
    two = llm.chat([conversation, conversation],
                   params,
                   use_tqdm=False,
                   chat_template=TEMPLATE,
                   add_generation_prompt=False)
    assert len(two) == 2 and not two[0].prompt.endswith("<assistant>:")


def test_chat_without_template_is_clear_error(stories260k_path: Path) -> None:
    llm = LLM(str(stories260k_path), device="cpu")
    with pytest.raises(ValueError, match="Cannot render the conversation"):
        llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)


def test_default_sampling_params_come_from_generation_config(
        stories260k_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "m"
    shutil.copytree(stories260k_path, path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(temperature=0.7, top_p=0.8, max_new_tokens=5)
    (path / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(path), device="cpu")
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.max_tokens) == (0.7, 0.8,
                                                                     5)
    out = llm.generate("Once upon a time", use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) <= 5
