"""ChatML (Qwen2.5), Mistral v0.3 and Llama 2 chat templates against transformers'
`apply_chat_template` with each model's official template (embedded below, verbatim from the
models' tokenizer_config.json), on tiny tokenizers trained here: token for token, and the loss
mask covers exactly the assistant replies and the token that ends them."""

import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ultralong_jax.data import bad_input as bi
from ultralong_jax.data import chat_template
from ultralong_jax.data import tokenizer as tok_lib

from .conftest import training_texts

# Qwen/Qwen2.5-7B-Instruct tokenizer_config.json "chat_template".
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query."
    "\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": "
    "<function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")

# Qwen/Qwen3-8B tokenizer_config.json "chat_template".
QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json "chat_template".
MISTRAL_V03_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json "chat_template".
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

QWEN25_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

CHATS = {
    "no_system": [{"role": "user", "content": "What is 12 + 345?"},
                  {"role": "assistant", "content": "It is 357."}],
    "system_multi_turn": [
        {"role": "system", "content": "  You read whole books.\n"},
        {"role": "user", "content": "the cat sat"},
        {"role": "assistant", "content": "on a mat!\n\n"},
        {"role": "user", "content": " ünïcödé 漢字 🙂 questions?"},
        {"role": "assistant", "content": "answers: 6789; rivers"}],
    "newlines_and_tabs": [{"role": "user", "content": "tab\tnew\nline\n\n"},
                          {"role": "assistant", "content": "\n numbers 12\n345"}],
    # Qwen3 keeps the reasoning of the turns after the last user message only.
    "reasoning": [{"role": "user", "content": "What is 12 + 345?"},
                  {"role": "assistant", "content": "<think>\nadd\n</think>\n\nIt is 357."},
                  {"role": "user", "content": "the cat sat"},
                  {"role": "assistant", "content": "<think>\non a mat\n</think>\n\nrivers"},
                  {"role": "user", "content": "numbers"},
                  {"role": "assistant", "content": "6789"}],
    # Mistral puts the system text into the last user turn only when that turn ends the chat.
    "ends_with_user": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "the cat"},
                       {"role": "assistant", "content": "sat"},
                       {"role": "user", "content": "on a mat?"}],
}


def _train(path, pre_tokenizer, decoder, special_tokens, vocab_size=600):
  tok = Tokenizer(models.BPE(unk_token=special_tokens[0] if special_tokens[0] == "<unk>" else None))
  tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
  texts = training_texts() + [m["content"] for chat in CHATS.values() for m in chat] + [
      "[INST]", "<<SYS>>", "<</SYS>>", QWEN25_DEFAULT]
  alphabet = (pre_tokenizers.ByteLevel.alphabet()
              if isinstance(decoder, decoders.ByteLevel)
              else sorted(set("".join(texts)) | {"\u2581"}))  # every character: no <unk>
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                show_progress=False, initial_alphabet=alphabet)
  tok.train_from_iterator(texts, trainer)
  tok.save(path)
  return path


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("family_tokenizers")
  return {
      # Byte-level BPE with Qwen's special tokens.
      "chatml": _train(str(d / "qwen.json"), pre_tokenizers.ByteLevel(add_prefix_space=False),
                       decoders.ByteLevel(), ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                              "<think>", "</think>"]),
      # SentencePiece-style (Metaspace, "▁" word prefix) as Llama 2 and Mistral ship them;
      # Mistral v0.3 has [INST] / [/INST] as control tokens, Llama 2 spells them in text.
      "mistral": _train(str(d / "mistral.json"), pre_tokenizers.Metaspace(),
                        decoders.Metaspace(), ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]),
      "llama2": _train(str(d / "llama2.json"), pre_tokenizers.Metaspace(), decoders.Metaspace(),
                       ["<unk>", "<s>", "</s>"]),
  }


TEMPLATES = {"chatml": (QWEN25_TEMPLATE, "<|im_end|>"), "qwen3": (QWEN3_TEMPLATE, "<|im_end|>"),
             "mistral": (MISTRAL_V03_TEMPLATE, "</s>"),
             "llama2": (LLAMA2_TEMPLATE, "</s>")}


def _reference(path, name):
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  ref = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<s>", eos_token="</s>")
  ref.chat_template = TEMPLATES[name][0]
  return ref


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("chat", sorted(CHATS))
def test_matches_transformers_apply_chat_template(name, chat, tokenizers_dir):
  messages = CHATS[chat]
  path = tokenizers_dir["chatml" if name == "qwen3" else name]
  reference = _reference(path, name)
  expected = reference.apply_chat_template(messages, tokenize=True)
  expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
  template = chat_template.make_chat_template(name, tok_lib.load_tokenizer(path))
  ids, trainable = template.render(messages)
  assert ids.tolist() == expected
  # Trained: each reply and the token that ends it. For ChatML, the reference rendering's text
  # after each `<|im_start|>assistant\n` through `<|im_end|>` (Qwen3: with its think block); for
  # [INST], the trimmed replies and `</s>`. Whitespace is compared loosely: a token that merges
  # the header's newline (or a SentencePiece word's leading space) into a reply is trained on.
  if name in ("chatml", "qwen3"):
    text = reference.apply_chat_template(messages, tokenize=False)
    turns = text.split("<|im_start|>assistant\n")[1:]
    replies = [t[:t.index("<|im_end|>")] + "<|im_end|>" for t in turns]
  else:
    replies = [m["content"].strip() + "</s>" for m in messages if m["role"] == "assistant"]
  trained = template.tokenizer.decode(ids[trainable == 1])
  assert "".join(trained.split()) == "".join("".join(replies).split())


@pytest.mark.parametrize("name", ["mistral", "llama2"])
def test_inst_templates_refuse_what_the_official_ones_raise_on(name, tokenizers_dir):
  template = chat_template.make_chat_template(name, tok_lib.load_tokenizer(tokenizers_dir[name]))
  with pytest.raises(chat_template.ChatFormatError, match="alternating") as e:
    template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
  assert e.value.kind == bi.INVALID_FIELD


def test_unknown_template_and_sentencepiece_model_are_refused(sp_model_path):
  tokenizer = tok_lib.load_tokenizer(sp_model_path)
  with pytest.raises(ValueError, match=r"data.chat.template='vicuna'.*chatml"):
    chat_template.make_chat_template("vicuna", tokenizer)
  with pytest.raises(ValueError, match="tokenizer.json"):
    chat_template.make_chat_template("chatml", tokenizer)
