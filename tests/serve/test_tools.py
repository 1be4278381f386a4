"""Tools (function calling) on /v1/chat/completions (jaxllm.serve.http.tools).

Contract:
  - parsing: a reply in the hermes (Qwen) or llama3_json (Llama 3.1/3.2) format becomes OpenAI
    tool_calls (name, arguments as JSON text) and content (the text outside the calls); invalid,
    unknown or cut-off calls stay content; fed piece by piece (streaming) it gives the same result;
  - rendering: the template gets `tools` and the history's tool_calls / tool messages (Hugging Face
    apply_chat_template semantics), the plain default template included; the format follows the
    template;
  - validation: malformed tools, unknown tool names and choices without tools are 400s naming the field;
  - end to end with the official `openai` client on a random-weight model and a Qwen-style tokenizer
    built here: tool_choice "required" and a named tool return calls whose arguments validate against
    the tool's parameters (jsonschema), streamed and not: only the grammar can make that hold.
"""

import json

import pytest
from test_http import TOK

from jaxllm.config import ConfigError, ServeConfig
from jaxllm.serve.http import chat_request, protocol
from jaxllm.serve.http.chat import DEFAULT_TEMPLATE, ChatTemplate
from jaxllm.serve.http.errors import APIError
from jaxllm.serve.http.tools import ToolCall, ToolParser, ToolRequest, parse, template_format

NAMES = ("get_weather", "add")
WEATHER = {
  "type": "function",
  "function": {
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {
      "type": "object",
      "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer"}},
      "required": ["city"],
      "additionalProperties": False,
    },
  },
}
ADD = {
  "type": "function",
  "function": {
    "name": "add",
    "parameters": {
      "type": "object",
      "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "boolean"}},
      "required": ["a", "b"],
      "additionalProperties": False,
    },
  },
}


# ---- parsing model text --------------------------------------------------------------------------

HERMES_TWO = (
  "Let me check.\n"
  '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
  '<tool_call>\n{"name":"add","arguments":{"a":1,"b":true}}\n</tool_call>'
)
WEATHER_CALL = ToolCall("get_weather", '{"city": "Paris"}')
ADD_CALL = ToolCall("add", '{"a": 1, "b": true}')

# (format, model text, parallel, content, calls)
PARSES = [
  ("hermes", HERMES_TWO, True, "Let me check.", [WEATHER_CALL, ADD_CALL]),
  ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1, "b": true}}</tool_call>', True, None, [ADD_CALL]),
  # parallel_tool_calls false: the second call stays content
  (
    "hermes",
    HERMES_TWO,
    False,
    'Let me check.<tool_call>\n{"name":"add","arguments":{"a":1,"b":true}}\n</tool_call>',
    [WEATHER_CALL],
  ),
  # an unknown tool, broken JSON and a call cut off mid-way stay content, as written
  ("hermes", '<tool_call>{"name": "nope", "arguments": {}}</tool_call> ok', True, None, []),
  ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1,}</tool_call>', True, None, []),
  ("hermes", 'Sure <tool_call>{"name": "add", "argu', True, None, []),
  ("hermes", "A plain answer with <tool and </tool_call>.", True, None, []),
  # an unclosed last call that parses counts (a stop before the close marker)
  ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": true}}', True, None, [ADD_CALL]),
  # arguments sent as a JSON string
  (
    "hermes",
    '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": true}"}</tool_call>',
    True,
    None,
    [ADD_CALL],
  ),
  # llama3_json: calls open the reply, ";"-separated, optionally after <|python_tag|>; "arguments" accepted
  (
    "llama3_json",
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
    '{"name": "add", "arguments": {"a": 1, "b": true}}',
    True,
    None,
    [WEATHER_CALL, ADD_CALL],
  ),
  ("llama3_json", '  {"name": "add", "parameters": {"a": 1, "b": true}}\nDone.', True, "Done.", [ADD_CALL]),
  (
    "llama3_json",
    '{"name": "add", "parameters": {"a": 1, "b": true}}; {"name": "add", "parameters": {}}',
    False,
    None,
    None,
  ),
  ("llama3_json", 'Here: {"name": "add", "parameters": {"a": 1, "b": true}}', True, None, []),
  ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Pa}ris\\""}}', True, None, None),
  ("llama3_json", '{"name": "get_weather", "parameters": {"city": ', True, None, []),
  ("llama3_json", '{"a": 1}', True, None, []),
]


@pytest.mark.parametrize("fmt,text,parallel,content,calls", PARSES)
def test_parse_and_stream_agree(fmt, text, parallel, content, calls):
  got_content, got_calls = parse(text, ToolParser(fmt, NAMES, parallel))
  if calls is None:  # the first call only (parallel off), or a call with a brace inside a string
    assert len(got_calls) == 1 and got_calls[0].name in NAMES
  else:
    assert got_calls == calls
    assert got_content == (text if not calls and content is None else content)
  # Streamed: fed one character (or token-sized pieces) at a time, the same content and calls.
  for step in (1, 3, 7):
    p, items = ToolParser(fmt, NAMES, parallel), []
    for k in range(0, len(text), step):
      items += p.feed(text[k : k + step])
    items += p.finish()
    assert [x for x in items if isinstance(x, ToolCall)] == got_calls
    assert "".join(x for x in items if isinstance(x, str)) == (got_content or "")


def test_content_streams_before_a_call_is_complete():
  p = ToolParser("hermes", NAMES)
  assert p.feed("Hello there, ") == ["Hello there,"]  # trailing whitespace waits for what follows
  assert p.feed("friend <tool") == [" friend"]  # "<tool" may open a call: held back
  assert p.feed('_call>{"name": "add", "arguments": {"a": 1, "b": true}}') == []
  assert p.feed("</tool_call>") == [ADD_CALL]
  assert p.finish() == []


def test_tool_call_deltas_have_openai_shape():
  head, args = ADD_CALL.deltas(2)
  (h,) = head["tool_calls"]
  assert h["index"] == 2 and h["id"].startswith("call_") and h["type"] == "function"
  assert h["function"] == {"name": "add", "arguments": ""}
  assert args == {"tool_calls": [{"index": 2, "function": {"arguments": ADD_CALL.arguments}}]}
  m = ADD_CALL.message()
  assert m["id"].startswith("call_") and m["function"] == {"name": "add", "arguments": ADD_CALL.arguments}


# ---- rendering -----------------------------------------------------------------------------------

# A Qwen2.5-style template (hermes calls), written for this test: tools in the system turn, an
# assistant's calls as <tool_call> blocks, tool results as <tool_response> in a user turn.
QWEN_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call a function as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{{ m.content }}
{%- for tc in m.tool_calls or [] %}
{%- set f = tc.function if tc.function is defined else tc %}
<tool_call>
{"name": "{{ f.name }}", "arguments": {{ f.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# The header Llama 3.1 / 3.2 templates write (enough to be recognised as llama3_json).
LLAMA_TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
  "{{ m.content }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
  """A byte-level BPE without merges (one token per byte) plus Qwen's chat tokens: <|im_end|> is the
  EOS, <tool_call> / </tool_call> are added (not special) tokens, as in Qwen2.5's tokenizer."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  from jaxllm.data import load_tokenizer

  vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  tok.add_tokens(["<tool_call>", "</tool_call>"])
  d = tmp_path_factory.mktemp("qwen_tok")
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": QWEN_TEMPLATE}))
  return load_tokenizer(str(d))


HISTORY = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "Weather in Paris?"},
  {
    "role": "assistant",
    "content": None,
    "tool_calls": [
      {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ],
  },
  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_qwen_template_renders_tools_and_tool_history(qwen_tok):
  t = ChatTemplate(qwen_tok.chat_template, qwen_tok)
  assert t.tool_format == "hermes" and t.is_token("<tool_call>") and not t.is_token("<tools>")
  text = t.render(chat_request.chat_history(HISTORY), tools=[WEATHER])
  assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n" + json.dumps(WEATHER) + "\n</tools>")
  # The call's arguments reach the template as an object (rendered by its tojson), not a string.
  assert (
    '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
  )
  assert text.endswith("<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
  # Encoded with the tokenizer's own ids for the chat tokens.
  ids = t.encode(chat_request.chat_history(HISTORY), tools=[WEATHER])
  assert qwen_tok.tokenizer.token_to_id("<tool_call>") in ids and qwen_tok.tokenizer.token_to_id("<|im_end|>") in ids


def test_rendering_equals_transformers_apply_chat_template(qwen_tok):
  """Both templates render tools and tool history as transformers does (the default one is what
  jaxllm.io.export writes into an exported tokenizer_config.json)."""
  transformers = pytest.importorskip("transformers")
  hf = transformers.PreTrainedTokenizerFast(tokenizer_file=qwen_tok.path, eos_token="<|im_end|>")
  messages = chat_request.chat_history(HISTORY)
  for template in (QWEN_TEMPLATE, None):
    want = hf.apply_chat_template(
      messages,
      tools=[WEATHER, ADD],
      chat_template=template or DEFAULT_TEMPLATE,
      add_generation_prompt=True,
      tokenize=False,
    )
    assert ChatTemplate(template, qwen_tok).render(messages, tools=[WEATHER, ADD]) == want


def test_default_template_renders_tools_and_tool_history():
  t = ChatTemplate(None, TOK)
  assert t.tool_format == "hermes"
  assert t.render(chat_request.chat_history(HISTORY), tools=[WEATHER]) == (
    f"tools: {json.dumps([WEATHER])}\n"
    "system: Be brief.\nuser: Weather in Paris?\n"
    'assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
    "tool: sunny\nassistant:"
  )
  # Without tools, the transcript is what it always was.
  assert t.render([{"role": "user", "content": "Hi"}]) == "user: Hi\nassistant:"


def test_format_follows_template_or_config():
  assert template_format(None) == "hermes" and template_format(QWEN_TEMPLATE) == "hermes"
  assert template_format(LLAMA_TEMPLATE) == "llama3_json"
  assert template_format(QWEN_TEMPLATE, "llama3_json") == "llama3_json"
  assert ChatTemplate(LLAMA_TEMPLATE, TOK).tool_format == "llama3_json"
  with pytest.raises(ConfigError, match="serve.tool_parser"):
    ServeConfig(tool_parser="mistral")


# ---- validation ----------------------------------------------------------------------------------

INFO = protocol.ModelInfo(name="m", vocab_size=384, context=4096, eos_ids=(TOK.eos_id,), max_n=4)
MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(**fields):
  return protocol.parse_chat({"messages": MESSAGES, "max_tokens": 8} | fields, INFO, ChatTemplate(None, TOK))


def test_tool_fields_parsed():
  assert chat().tools is None and chat(tools=[]).tools is None and chat(tools=None, tool_choice="auto").tools is None
  req = chat(tools=[WEATHER, ADD])
  assert req.tools == ToolRequest((WEATHER, ADD), "auto", None, True, "hermes")
  assert chat(tools=[WEATHER, ADD], tool_choice="none").tools.parser() is None
  named = chat(tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}})
  assert (
    named.tools.choice == "function" and named.tools.function == "add" and named.tools.allowed() == [ADD["function"]]
  )
  assert not chat(tools=[ADD], tool_choice="required", parallel_tool_calls=False).tools.parallel
  # The rendered prompt lists the tools.
  assert TOK.decode(chat(tools=[ADD]).prompt_ids).startswith("tools: " + json.dumps([ADD]))


# (fields, the field named in the 400, words of the message)
BAD = [
  ({"tools": {"type": "function"}}, "tools", "must be an array"),
  ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools[0].type", '"function"'),
  ({"tools": [{"type": "function"}]}, "tools[0].function", "missing"),
  ({"tools": [{"type": "function", "function": "f"}]}, "tools[0].function", "must be an object"),
  ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name", "missing"),
  ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "letters, digits"),
  ({"tools": [ADD, ADD]}, "tools[1].function.name", "unique"),
  (
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
    "tools[0].function.parameters",
    "object",
  ),
  ({"tools": [{"type": "function", "function": {"name": "f", "code": "x"}}]}, "tools[0].function.code", "unsupported"),
  ({"tools": [ADD], "tool_choice": "always"}, "tool_choice", "one of none, auto, required"),
  ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice", "add"),
  ({"tools": [ADD], "tool_choice": {"type": "function"}}, "tool_choice.function.name", "missing"),
  ({"tool_choice": "required"}, "tool_choice", "no 'tools'"),
  ({"tools": [], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice", "none given"),
  ({"tools": [ADD], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
]


@pytest.mark.parametrize("fields,param,words", BAD)
def test_bad_tool_fields_are_400s(fields, param, words):
  with pytest.raises(APIError) as e:
    chat(**fields)
  assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_bad_tool_history_is_400():
  bad_calls = [{"role": "assistant", "content": None, "tool_calls": {"id": "x"}}]
  for messages, param in [
    (MESSAGES + bad_calls, "messages[1].tool_calls"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages[0].tool_call_id"),
    ([{"role": "tool", "content": "x", "tool_call_id": 3}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {}}]}], None),
  ]:
    with pytest.raises(APIError) as e:
      protocol.parse_chat({"messages": messages}, INFO, ChatTemplate(None, TOK))
    assert e.value.status == 400 and (param is None or e.value.param == param)


def test_required_and_named_choices_get_a_grammar(qwen_tok):
  qwen = ChatTemplate(qwen_tok.chat_template, qwen_tok)
  parse_qwen = lambda **f: protocol.parse_chat({"messages": MESSAGES, "max_tokens": 8} | f, INFO, qwen)
  assert all(sp.grammar is None for sp in parse_qwen(tools=[ADD]).sampling)  # auto: free text
  kind, spec = parse_qwen(tools=[WEATHER, ADD], tool_choice="required", n=2).sampling[1].grammar
  # Qwen's <tool_call> is one token: the grammar names it as such; the byte tokenizer spells it.
  assert kind == "lark" and "<tool_call>" in spec and '"<tool_call>"' not in spec and "anyOf" in spec
  assert '"<tool_call>"' in chat(tools=[ADD], tool_choice="required").sampling[0].grammar[1]
  named = chat(tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}})
  assert '"const": "add"' in named.sampling[0].grammar[1] and "get_weather" not in named.sampling[0].grammar[1]
  # A parameters schema the grammar engine rejects is a 400 naming `tools`.
  bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$ref": "#/nowhere"}}}
  with pytest.raises(APIError) as e:
    chat(tools=[bad], tool_choice="required")
  assert e.value.status == 400 and e.value.param == "tools"


# ---- end to end: the openai client, a random-weight model ----------------------------------------


@pytest.fixture(scope="module")
def qwen_srv(qwen_tok):
  """The HTTP server on a random-weight model with the Qwen-style tokenizer and template."""
  import dataclasses

  from test_http import KEY, Server, serving
  from test_serve import DENSE, params_of

  from jaxllm.config import ServeConfig
  from jaxllm.serve.engine import Engine
  from jaxllm.serve.http import create_app
  from jaxllm.serve.service import EngineService

  cfg = dataclasses.replace(DENSE, vocab_size=384, max_seq_len=1024)
  sc = ServeConfig(
    page_size=16, num_pages=260, max_running=4, chunk_size=256, min_seqs=4, min_tokens=256, api_key=KEY, max_n=4
  )
  engine = Engine(cfg, params_of(cfg), sc, tokenizer=qwen_tok)
  service = EngineService(engine, max_waiting=sc.max_waiting).start()
  try:
    with serving(create_app(service, qwen_tok, "qwen-tiny", sc, qwen_tok.chat_template)) as url:
      yield Server(url, service, engine)
  finally:
    service.close()


ASK = [{"role": "user", "content": "Weather in Rome, and 2+3?"}]
TOOLS = {t["function"]["name"]: t for t in (WEATHER, ADD)}


def check_calls(calls):
  """Every call names a tool of the request and its arguments validate against its parameters."""
  import jsonschema

  assert calls
  for c in calls:
    assert c["id"].startswith("call_") and c["type"] == "function"
    jsonschema.validate(json.loads(c["function"]["arguments"]), TOOLS[c["function"]["name"]]["function"]["parameters"])


def streamed(chunks) -> tuple[list, str | None, str]:
  """(tool calls rebuilt from the deltas as OpenAI's client-side accumulation does, finish, content)."""
  calls, finish, content = {}, None, ""
  for ch in chunks:
    for c in ch.choices:
      content += c.delta.content or ""
      finish = c.finish_reason or finish
      for d in c.delta.tool_calls or []:
        if d.index not in calls:  # the first delta of a call: id, type and name
          assert d.id.startswith("call_") and d.type == "function" and d.function.name
          calls[d.index] = {"id": d.id, "type": d.type, "function": {"name": d.function.name, "arguments": ""}}
        calls[d.index]["function"]["arguments"] += d.function.arguments or ""
  return [calls[k] for k in sorted(calls)], finish, content


def test_required_returns_valid_calls_streamed_and_not(qwen_srv):
  client = qwen_srv.client()
  for seed in range(3):
    kw = dict(model="qwen-tiny", messages=ASK, tools=[WEATHER, ADD], tool_choice="required", max_tokens=200, seed=seed)
    one = client.chat.completions.create(**kw, parallel_tool_calls=False, temperature=1.0)
    m = one.choices[0].message
    assert one.choices[0].finish_reason == "tool_calls" and m.content is None and len(m.tool_calls) == 1
    check_calls([c.model_dump() for c in m.tool_calls])
    # Streamed with the same seed: the same calls, as deltas.
    calls, finish, content = streamed(
      client.chat.completions.create(**kw, parallel_tool_calls=False, temperature=1.0, stream=True)
    )
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    assert calls[0]["function"] == m.tool_calls[0].function.model_dump()
    check_calls(calls)
    # Every token's logprob is streamed exactly once, though the call's text is held back.
    chunks = list(
      client.chat.completions.create(
        **kw, temperature=1.0, stream=True, logprobs=True, stream_options={"include_usage": True}
      )
    )
    lps = [lp for ch in chunks for c in ch.choices if c.logprobs for lp in c.logprobs.content]
    assert len(lps) == chunks[-1].usage.completion_tokens
    check_calls(streamed(chunks)[0])
    # Parallel calls allowed: one or more, each valid (a last one max_tokens cut off stays content).
    many = client.chat.completions.create(**kw, temperature=1.0)
    check_calls([c.model_dump() for c in many.choices[0].message.tool_calls])


def test_named_tool_choice_returns_that_tool(qwen_srv):
  client = qwen_srv.client()
  for name in ("add", "get_weather"):
    r = client.chat.completions.create(
      model="qwen-tiny",
      messages=ASK,
      tools=[WEATHER, ADD],
      tool_choice={"type": "function", "function": {"name": name}},
      max_tokens=200,
      temperature=1.0,
      n=2,
    )
    for choice in r.choices:
      (call,) = choice.message.tool_calls
      assert call.function.name == name and choice.finish_reason == "tool_calls"
      check_calls([call.model_dump()])
  # Streamed with n=2: each choice's deltas rebuild one call of that tool.
  chunks = list(
    client.chat.completions.create(
      model="qwen-tiny",
      messages=ASK,
      tools=[WEATHER, ADD],
      tool_choice={"type": "function", "function": {"name": "add"}},
      max_tokens=200,
      temperature=1.0,
      n=2,
      stream=True,
    )
  )
  for i in range(2):
    calls, finish, content = streamed([ch for ch in chunks if ch.choices and ch.choices[0].index == i])
    assert len(calls) == 1 and calls[0]["function"]["name"] == "add" and finish == "tool_calls" and content == ""
    check_calls(calls)


def test_auto_parses_what_the_model_wrote_and_history_renders(qwen_srv, qwen_tok):
  client = qwen_srv.client()
  history = HISTORY + [{"role": "user", "content": "And 2+3?"}]
  kw = dict(model="qwen-tiny", messages=history, tools=[WEATHER, ADD], max_tokens=40, temperature=1.0, seed=7)
  raw = client.chat.completions.create(**kw, tool_choice="none")
  auto = client.chat.completions.create(**kw)
  # The tool-role history rendered through the model's template, tools included.
  prompt = ChatTemplate(qwen_tok.chat_template, qwen_tok).encode(
    chat_request.chat_history(history), tools=[WEATHER, ADD]
  )
  assert raw.usage.prompt_tokens == auto.usage.prompt_tokens == len(prompt)
  # Same seed, same text; "auto" returns it parsed (random weights: plain content, calls if any).
  content, calls = parse(raw.choices[0].message.content, ToolParser("hermes", NAMES))
  assert auto.choices[0].message.content == content
  assert [(c.function.name, c.function.arguments) for c in auto.choices[0].message.tool_calls or []] == [
    (c.name, c.arguments) for c in calls
  ]


# (format, tokenizer, tool_choice, parallel): the grammar's random walks all parse as valid calls
WALKS = [
  ("hermes", "qwen", "required", True),
  ("hermes", "byte", "required", False),
  ("hermes", "byte", "add", True),
  ("llama3_json", "byte", "required", True),
  ("llama3_json", "qwen", "get_weather", True),
]


@pytest.mark.parametrize("fmt,tok_name,choice,parallel", WALKS)
def test_grammar_walks_parse_as_valid_calls(fmt, tok_name, choice, parallel, qwen_tok):
  """Whatever the weights: tokens drawn uniformly among those the grammar allows (the stop token
  when it is allowed too) always read back as valid calls, in either format and tokenizer."""
  import numpy as np

  from jaxllm.serve.grammar import GrammarCompiler

  tok = qwen_tok if tok_name == "qwen" else TOK
  template = ChatTemplate(qwen_tok.chat_template if tok_name == "qwen" else None, tok, fmt)
  named = choice not in ("required",)
  req = ToolRequest((WEATHER, ADD), "function" if named else choice, choice if named else None, parallel, fmt)
  compiler, rng = GrammarCompiler(tok, 384), np.random.default_rng(0)
  for _ in range(10):
    m, out = compiler.matcher(template.tool_grammar(req), (tok.eos_id,)), []
    for _ in range(400):
      allowed = np.flatnonzero(np.unpackbits(m.next_mask().view(np.uint8), bitorder="little"))
      t = int(rng.choice(allowed))
      if t == tok.eos_id:
        break
      assert m.consume([t])
      out.append(t)
      if m.done:
        break
    content, calls = parse(tok.decode(out), ToolParser(fmt, NAMES, parallel))
    assert content is None and calls and (parallel or len(calls) == 1)
    check_calls([c.message() for c in calls])
    assert not named or {c.name for c in calls} == {choice}


def test_auto_returns_a_forced_call_streamed_and_not(qwen_srv):
  """ "auto" on a reply forced (vLLM's guided_grammar, Lark) to be content and then a call: the call
  comes back as tool_calls and the text before it as content, streamed (content first) and not.
  <tool_call> is Qwen's added token, which llguidance's Lark names as a token."""
  client = qwen_srv.client()
  lark = r"""start: "Sure. " <tool_call> "\n" CALL "\n" </tool_call>
CALL: "{\"name\": \"add\", \"arguments\": {\"a\": " /[1-9]/ ", \"b\": " ("true" | "false") "}}"
"""
  kw = dict(model="qwen-tiny", messages=ASK, tools=[WEATHER, ADD], max_tokens=120, temperature=1.0, seed=3)
  r = client.chat.completions.create(**kw, extra_body={"guided_grammar": lark})
  m = r.choices[0].message
  assert m.content == "Sure." and r.choices[0].finish_reason == "tool_calls"
  (call,) = m.tool_calls
  assert call.function.name == "add"
  check_calls([call.model_dump()])
  chunks = list(client.chat.completions.create(**kw, extra_body={"guided_grammar": lark}, stream=True))
  calls, finish, content = streamed(chunks)
  assert content == "Sure." and finish == "tool_calls" and calls[0]["function"] == call.function.model_dump()
  deltas = [c.delta for ch in chunks for c in ch.choices if c.delta.content or c.delta.tool_calls]
  kinds = ["content" if d.content else "call" for d in deltas]  # the text as it came, then header and arguments
  assert kinds == ["content"] * (len(kinds) - 2) + ["call", "call"] and len(kinds) > 2
