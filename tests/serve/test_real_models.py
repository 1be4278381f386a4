"""Real chat models through the server: a Llama-3-Instruct-style Hugging Face directory built here with
`transformers` (random weights, a byte-level BPE tokenizer with <|eot_id|> & co., a chat template, a
generation_config.json listing two EOS ids and sampling defaults), served as `serve.py --hf DIR` serves
it (jaxllm.serve.http.server.build over jaxllm.io.load_model), driven by raw HTTP with vLLM's fields.

Outputs are steered with logit_bias (+100 on a token makes greedy decoding emit it), so each test
knows which token comes next. Reference for tokenization: transformers' own tokenizer of the directory.
"""

import json
import os
import shutil

import httpx
import numpy as np
import pytest
from test_http import serving

import serve
from jaxllm.config import ServeConfig
from jaxllm.io import load_model
from jaxllm.serve.http import protocol
from jaxllm.serve.http.chat import ChatTemplate
from jaxllm.serve.http.server import build

torch = pytest.importorskip("torch", reason="building the HF model needs CPU torch")
transformers = pytest.importorskip("transformers")

# Special tokens first: ids 0..4. <|eot_id|> (0) is the chat end of turn, the SECOND id of
# generation_config.json's eos list; the tokenizer's own eos is <|end_of_text|> (2), the first.
SPECIALS = ["<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
EOT, BOS, END, HEADER = 0, 1, 2, 3
TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
  "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
  "<|start_header_id|>assistant<|end_header_id|>\n\n"
  "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}{% endif %}"
)
GENERATION = {"eos_token_id": [END, EOT], "temperature": 0.6, "top_p": 0.9, "top_k": 7, "max_new_tokens": 5}
VOCAB = 320  # the model's (the tokenizer's ~300 ids padded)
# One bucket per step kind (4 sequences, 32 tokens), one decode step per call: 2 compiles in all,
# shared by the offline CLI run (same settings as serve.* overrides).
SERVE_KEYS = dict(page_size=8, num_pages=80, max_running=4, chunk_size=32, min_seqs=4, min_tokens=32, decode_steps=1)
SERVE = ServeConfig(**SERVE_KEYS, max_n=2)
CLI_SERVE = [f"serve.{k}={v}" for k, v in SERVE_KEYS.items()]


def _tokenizer(directory):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(["hello there, how are you? user assistant system think"] * 10, trainer)
  # Llama-3's post-processor: every input starts with <|begin_of_text|>.
  tok.post_processor = processors.TemplateProcessing(
    single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", BOS)]
  )
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": TEMPLATE}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)


def _hf_llama(directory):
  cfg = transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=BOS,
    eos_token_id=END,
  )
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
  _tokenizer(directory)
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    json.dump(GENERATION, f)  # over the one save_pretrained wrote
  return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return _hf_llama(str(tmp_path_factory.mktemp("llama3ish")))


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
  return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def srv(hf_dir):
  model = load_model(hf_dir)
  app, service = build(model, SERVE)
  try:
    with serving(app) as url, httpx.Client(base_url=url, timeout=120) as http:
      http.model, http.app = model, app
      yield http
  finally:
    service.close()


def post(srv, path, body, status=200):
  r = srv.post(path, json=body)
  assert r.status_code == status, r.text
  return r.json()


def chat(srv, content="hello", **kw):
  body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8} | kw
  out = post(srv, "/v1/chat/completions", body)
  return out["choices"][0], out["usage"]


def token_of(srv, text):
  ids = srv.model.tokenizer.encode(text)
  assert len(ids) == 1, (text, ids)
  return ids[0]


# ---- every EOS stops -----------------------------------------------------------------------------


def test_second_eos_of_generation_config_stops_the_chat(srv):
  """Must show: generation_config.json lists two EOS ids; the model emits the second (the chat
  end-of-turn, not the tokenizer's eos) and the server stops there."""
  assert srv.model.eos_ids == (END, EOT) and srv.model.tokenizer.eos_id == END
  choice, usage = chat(srv, logit_bias={str(EOT): 100})
  assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""
  assert usage["completion_tokens"] == 1
  # The bias alone does not end a request: with ignore_eos it runs to the length limit.
  choice, usage = chat(srv, logit_bias={str(EOT): 100}, ignore_eos=True)
  assert choice["finish_reason"] == "length" and usage["completion_tokens"] == 8
  # The first id, and the same on /v1/completions and /generate.
  assert chat(srv, logit_bias={str(END): 100})[0]["finish_reason"] == "stop"
  out = post(srv, "/v1/completions", {"prompt": "hello", "max_tokens": 8, "temperature": 0, "logit_bias": {EOT: 100}})
  assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 1
  out = post(srv, "/generate", {"text": "hello", "sampling_params": {"temperature": 0, "logit_bias": {EOT: 100}}})
  assert out["meta_info"]["finish_reason"]["type"] == "stop" and out["meta_info"]["completion_tokens"] == 1


def test_offline_generate_stops_on_the_second_eos(hf_dir, tmp_path, capsys):
  """serve.py generate --hf: a copy of the model whose lm_head is zero (all logits equal: greedy
  picks id 0, <|eot_id|>) stops after one token; without generation_config's list it would not."""
  from safetensors.numpy import load_file, save_file

  d = str(tmp_path / "zero_head")
  shutil.copytree(hf_dir, d)
  weights = load_file(os.path.join(d, "model.safetensors"))
  weights["lm_head.weight"] = np.zeros_like(weights["lm_head.weight"])
  save_file(weights, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
  argv = ["generate", "--hf", d, "--prompt", "hello", "--max-tokens", "6", "--temperature", "0", *CLI_SERVE]
  serve.main(argv)
  assert "[stop, 1 tokens" in capsys.readouterr().out
  os.remove(os.path.join(d, "generation_config.json"))
  serve.main(argv)
  assert "[length, 6 tokens" in capsys.readouterr().out


# ---- stop ids, stop strings, special tokens -----------------------------------------------------


def test_stop_token_ids_and_include_stop_str_in_output(srv):
  x = token_of(srv, "hello")
  choice, usage = chat(srv, logit_bias={str(x): 100}, stop_token_ids=[x])
  assert choice["finish_reason"] == "stop" and usage["completion_tokens"] == 1 and choice["message"]["content"] == ""
  choice, _ = chat(srv, logit_bias={str(x): 100}, stop_token_ids=[x], include_stop_str_in_output=True)
  assert choice["finish_reason"] == "stop" and choice["message"]["content"] == "hello"
  # A stop string: dropped by default, kept with include_stop_str_in_output.
  body = {"prompt": "hi", "max_tokens": 8, "temperature": 0, "logit_bias": {x: 100}, "stop": ["llohe"]}
  out = post(srv, "/v1/completions", body)["choices"][0]
  assert out["finish_reason"] == "stop" and out["text"] == "he"
  out = post(srv, "/v1/completions", body | {"include_stop_str_in_output": True})["choices"][0]
  assert out["finish_reason"] == "stop" and out["text"] == "hellohe"
  err = post(srv, "/v1/completions", body | {"stop_token_ids": [VOCAB]}, 400)
  assert err["error"]["param"] == "stop_token_ids"


def test_special_token_stop_string_matches_though_specials_are_skipped(srv):
  """A stop string that is a special token's text ("<|start_header_id|>", no EOS) matches the token
  even though the visible text leaves special tokens out."""
  bias = {str(HEADER): 100}
  choice, usage = chat(srv, logit_bias=bias)
  assert choice["finish_reason"] == "length" and choice["message"]["content"] == ""  # skipped: no text
  choice, usage = chat(srv, logit_bias=bias, stop=["<|start_header_id|>"])
  assert choice["finish_reason"] == "stop" and usage["completion_tokens"] == 1 and choice["message"]["content"] == ""
  choice, _ = chat(srv, logit_bias=bias, stop=["<|start_header_id|>"], include_stop_str_in_output=True)
  assert choice["message"]["content"] == "<|start_header_id|>"
  # streamed: the same
  with srv.stream(
    "POST",
    "/v1/chat/completions",
    json={"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 8, "stream": True}
    | {"logit_bias": bias, "stop": ["<|start_header_id|>"]},
  ) as r:
    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
  assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_skip_special_tokens_false_shows_special_token_text(srv):
  bias = {str(HEADER): 100}
  choice, _ = chat(srv, logit_bias=bias, max_tokens=3, skip_special_tokens=False)
  assert choice["message"]["content"] == "<|start_header_id|>" * 3
  out = post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 0, "logit_bias": bias})
  assert out["choices"][0]["text"] == ""
  body = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "logit_bias": bias, "skip_special_tokens": False}
  assert post(srv, "/v1/completions", body)["choices"][0]["text"] == "<|start_header_id|>" * 2
  # /generate takes SGLang's spelling of the same field
  body = {"text": "hi", "sampling_params": {"max_new_tokens": 2, "temperature": 0, "logit_bias": bias}}
  body["sampling_params"]["skip_special_tokens"] = False
  assert post(srv, "/generate", body)["text"] == "<|start_header_id|>" * 2


def test_min_tokens_gates_stop_strings(srv):
  x = token_of(srv, "hello")
  body = {"prompt": "hi", "max_tokens": 8, "temperature": 0, "logit_bias": {x: 100}, "stop": ["lo"]}
  out = post(srv, "/v1/completions", body)
  assert out["choices"][0]["text"] == "hel" and out["usage"]["completion_tokens"] == 1
  # vLLM: stop strings count only after min_tokens tokens; the 4th token's "lo" ends it.
  out = post(srv, "/v1/completions", body | {"min_tokens": 3})
  assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 4
  assert out["choices"][0]["text"] == "hello" * 3 + "hel"
  # the same for a special-token stop string
  choice, usage = chat(srv, logit_bias={str(HEADER): 100}, stop=["<|start_header_id|>"], min_tokens=2)
  assert choice["finish_reason"] == "stop" and usage["completion_tokens"] == 3


# ---- prompts: BOS, templates --------------------------------------------------------------------


def test_completions_add_bos_as_the_tokenizer_does(srv, hf_tok):
  body = {"prompt": "hello there", "max_tokens": 1, "return_token_ids": True}
  ids = post(srv, "/v1/completions", body)["choices"][0]["prompt_token_ids"]
  assert ids == hf_tok("hello there")["input_ids"] and ids[0] == BOS
  ids = post(srv, "/v1/completions", body | {"add_special_tokens": False})["choices"][0]["prompt_token_ids"]
  assert ids == hf_tok("hello there", add_special_tokens=False)["input_ids"] and BOS not in ids
  # token-id prompts are taken as they are
  out = post(srv, "/v1/completions", body | {"prompt": [5, 6]})
  assert out["choices"][0]["prompt_token_ids"] == [5, 6]


def test_chat_prompt_equals_transformers_and_takes_template_kwargs(srv, hf_tok):
  messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
  body = {"messages": messages, "max_tokens": 1, "return_token_ids": True}
  ids = post(srv, "/v1/chat/completions", body)["prompt_token_ids"]
  want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert ids == hf_tok(want, add_special_tokens=False)["input_ids"] and ids.count(BOS) == 1
  # add_special_tokens on chat: the tokenizer's BOS on top of the template's (as vLLM does)
  ids2 = post(srv, "/v1/chat/completions", body | {"add_special_tokens": True})["prompt_token_ids"]
  assert ids2 == [BOS] + ids
  # chat_template_kwargs reach the template
  ids3 = post(srv, "/v1/chat/completions", body | {"chat_template_kwargs": {"enable_thinking": False}})
  assert srv.model.tokenizer.decode(ids3["prompt_token_ids"]).endswith("assistant\n\n<think></think>")
  err = post(srv, "/v1/chat/completions", body | {"chat_template_kwargs": {"messages": []}}, 400)
  assert err["error"]["param"] == "chat_template_kwargs"
  # without the generation prompt
  ids4 = post(srv, "/v1/chat/completions", body | {"add_generation_prompt": False})["prompt_token_ids"]
  assert ids4[-1] == EOT


def test_continue_final_message(srv, hf_tok):
  messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "how are "}]
  body = {"messages": messages, "max_tokens": 1, "return_token_ids": True, "continue_final_message": True}
  ids = post(srv, "/v1/chat/completions", body | {"add_generation_prompt": False})["prompt_token_ids"]
  want = hf_tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
  assert ids == hf_tok(want, add_special_tokens=False)["input_ids"]
  assert srv.model.tokenizer.decode(ids).endswith("assistant\n\nhow are") and ids[-1] != EOT
  # add_generation_prompt left out means false here; explicitly true is vLLM's error
  assert post(srv, "/v1/chat/completions", body)["prompt_token_ids"] == ids
  err = post(srv, "/v1/chat/completions", body | {"add_generation_prompt": True}, 400)
  assert err["error"]["param"] == "continue_final_message" and "add_generation_prompt" in err["error"]["message"]


# ---- generation_config.json sampling defaults --------------------------------------------------


def test_generation_config_defaults_apply_when_a_request_omits_them(srv, hf_tok):
  info = srv.app.state.info
  assert info.defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 7, "max_tokens": 5}
  sp = protocol.parse_completion({"prompt": "hi"}, info, srv.model.tokenizer).sampling[0]
  assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.repetition_penalty) == (0.6, 0.9, 7, 5, 1.0)
  template = ChatTemplate(srv.model.chat_template, srv.model.tokenizer)
  body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 1, "top_k": 0}
  sp = protocol.parse_chat(body, info, template).sampling[0]
  assert (sp.temperature, sp.top_k, sp.top_p) == (1.0, 0, 0.9)  # given fields win
  # End to end: a seeded request without the fields equals one that spells the defaults out.
  body = {"prompt": "hello", "seed": 3, "ignore_eos": True}
  out = post(srv, "/v1/completions", body | {"return_token_ids": True})["choices"][0]
  assert len(out["token_ids"]) == 5
  spelled = body | {"temperature": 0.6, "top_p": 0.9, "top_k": 7, "max_tokens": 5, "return_token_ids": True}
  assert post(srv, "/v1/completions", spelled)["choices"][0]["token_ids"] == out["token_ids"]


# ---- the pieces on their own --------------------------------------------------------------------


def test_tokenizer_config_add_bos_token_overrides_the_post_processor(hf_dir, tmp_path):
  from jaxllm.data import load_tokenizer

  for flag, want_bos in ((False, False), (True, True), (None, True)):
    d = tmp_path / str(flag)
    d.mkdir()
    shutil.copy(os.path.join(hf_dir, "tokenizer.json"), d)
    config = {"bos_token": "<|begin_of_text|>"} | ({} if flag is None else {"add_bos_token": flag})
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(d))
    assert tok.encode_prompt("hello") == [BOS] * want_bos + tok.encode("hello")


def test_generation_defaults_are_checked(tmp_path):
  from jaxllm.io import ModelLoadError, generation_defaults

  assert generation_defaults(str(tmp_path)) == {}
  (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": -1, "do_sample": True, "min_p": 0.05}))
  assert generation_defaults(str(tmp_path)) == {"top_k": 0, "min_p": 0.05}
  (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0}))
  with pytest.raises(ModelLoadError, match="top_p=0 must be"):
    generation_defaults(str(tmp_path))
