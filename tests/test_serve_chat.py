"""``/v1/chat/completions`` for a Hugging Face model with a chat template, trained and served by zhilu."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from conftest import Server, zhilu
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("chat") / "llama"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [Path(transformers.__file__).read_text()] * 3
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, eos_token_id=None, bos_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    out = tmp_path_factory.mktemp("chat-run") / "run"
    result = zhilu("train", "--model", f"hf:{directory}", "--steps", "3", "--seq-len", "32", "--train.sample_tokens",
                   "0", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_chat_renders_the_models_template_and_answers_as_a_completion_would(chat_run: Path) -> None:
    server = Server(chat_run, "--model-name", "chat")
    try:
        client = server.client()
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main("}]
        chat = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
        prompt = "<|system|>Be brief.\n<|user|>def main(\n<|assistant|>"
        plain = client.completions.create(model="chat", prompt=prompt, max_tokens=10, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == plain.choices[0].text
        assert chat.usage.prompt_tokens == plain.usage.prompt_tokens
        assert chat.usage.completion_tokens == 10 and chat.choices[0].finish_reason == "length"
        streamed = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    finally:
        server.close()
