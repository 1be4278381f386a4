"""jaxllm.io.export: a training run's checkpoint written as a Hugging Face directory, checked with
`transformers` as the outside reader. Two runs: a jaxllm-native model with the byte tokenizer, and one
started from a Hugging Face directory whose tokenizer has a chat template and two EOS ids. Checks: logits
of the export in transformers equal jaxllm's forward of the checkpoint (fp32, test_hf's tolerance); the
tokenizer and chat template round-trip (the byte tokenizer is built as a byte-level tokenizer.json whose
ids equal ByteTokenizer's on every code point; a bare tokenizer.json gets its special tokens named; a run
without a template gets jaxllm's default one) and apply_chat_template gives jaxllm's ChatFormat ids;
generation_config.json lists every EOS id; reward-model checkpoints and occupied output directories are
refused in one line; a failed export leaves nothing behind; and the command line (--step, --dtype,
--max-shard-size) works as a subprocess."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_hf import TOKENS, _close, _forward, _hf_model
from test_load_model import CFG

from jaxllm.config import Config, TrainConfig
from jaxllm.data import ByteTokenizer, ChatFormat, HFTokenizer
from jaxllm.io import ModelLoadError, export_run, load_model
from jaxllm.io.checkpoint import CheckpointError
from jaxllm.io.export import REWARD_MODEL_KIND, byte_tokenizer_json, main
from jaxllm.model.params import model_def
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.optim import make_optimizer
from jaxllm.train.state import init_state

transformers = pytest.importorskip("transformers", reason="export tests read the export with transformers")
torch = pytest.importorskip("torch", reason="export tests need CPU torch: pip install torch==2.13.0")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
WORDS = ["<unk>", "user", "assistant", "hello", "world", "how", "are", "you"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 8, 9, 10
MESSAGES = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "how are you"}]


def _randomised(cfg, seed):
  """Parameters with O(1) weights (norms near 1), so logits are large and a layout bug cannot hide."""
  rng = np.random.RandomState(seed)

  def one(path, a):
    noise = rng.randn(*a.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else 0.25 * noise

  return jax.tree_util.tree_map_with_path(one, model_def(cfg).abstract_params())


def _save(directory, config, steps_params, data=None):
  """A checkpoint folder as a training run writes it, one step per (step, params)."""
  mdef = model_def(config.model)
  tx = make_optimizer(config.train, mdef.logical)
  ckpt = Checkpointer(directory, async_save=False)
  for step, params in steps_params:
    ckpt.save(step, init_state(mdef, tx, None, seed=0, params=params), data or {}, config)
  ckpt.close()
  return directory


def _hf_logits(out, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def _json(path):
  with open(path) as f:
    return json.load(f)


def _siblings(out):
  """Temporary or set-aside directories an export may have left beside `out`."""
  parent, name = os.path.split(str(out))
  return [n for n in os.listdir(parent) if n.startswith(name + ".")]


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
  """A jaxllm-native run (byte tokenizer, vocab padded to 384) with two steps."""
  root = tmp_path_factory.mktemp("byte_run")
  steps = [(1, _randomised(CFG, 1)), (2, _randomised(CFG, 2))]
  _save(str(root / "run" / "checkpoints"), Config(model=CFG), steps)
  return dict(run=str(root / "run"), cfg=CFG, params=dict(steps))


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
  """A run started from a Hugging Face qwen3 directory (transformers wrote the model and the tokenizer,
  with a chat template and generation_config listing two EOS ids), saved as a training checkpoint."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  src = str(tmp_path_factory.mktemp("qwen3"))
  _hf_model("qwen3", src)
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(SPECIALS)
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE
  )
  fast.save_pretrained(src)
  with open(os.path.join(src, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [10, 8], "temperature": 0.7}, f)
  m = load_model(src)
  assert m.eos_ids == (10, 8) and m.chat_template == TEMPLATE
  ckpt = str(tmp_path_factory.mktemp("hf_run") / "checkpoints")
  _save(ckpt, Config(model=m.cfg, train=TrainConfig(tokenizer=m.tokenizer_spec)), [(3, m.params)])
  return dict(src=src, ckpt=ckpt, cfg=m.cfg, params=m.params)


@pytest.fixture(scope="module")
def byte_out(byte_run, tmp_path_factory):
  return export_run(byte_run["run"], str(tmp_path_factory.mktemp("exports") / "byte"), log=lambda s: None)


@pytest.fixture(scope="module")
def hf_out(hf_run, tmp_path_factory):
  lines = []
  out = export_run(hf_run["ckpt"], str(tmp_path_factory.mktemp("exports") / "hf"), log=lines.append)
  assert any("with its chat template" in line for line in lines), lines
  return out


def test_logits_match_jaxllm(byte_run, hf_run, byte_out, hf_out):
  for out, cfg, params in [
    (byte_out, byte_run["cfg"], byte_run["params"][2]),  # the newest step by default
    (hf_out, hf_run["cfg"], hf_run["params"]),
  ]:
    ours = _forward(cfg, params, TOKENS)
    assert np.abs(ours).max() > 5.0, "randomised weights should give large logits"
    _close(ours, _hf_logits(out, TOKENS))
    assert _json(os.path.join(out, "config.json"))["torch_dtype"] == "float32"
    assert "model.safetensors" in os.listdir(out) and not _siblings(out)


def test_hf_tokenizer_and_chat_template_travel(hf_run, hf_out):
  names = os.listdir(hf_out)
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(names)
  theirs = transformers.AutoTokenizer.from_pretrained(hf_out)
  source = transformers.AutoTokenizer.from_pretrained(hf_run["src"])
  text = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  assert text == source.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  assert (
    text == "<|im_start|>user hello world<|im_end|><|im_start|>assistant how are you<|im_end|><|im_start|>assistant"
  )
  ids = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
  ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
  assert (
    list(ids)
    == HFTokenizer(os.path.join(hf_out, "tokenizer.json")).encode(text)
    == [9, 1, 3, 4, 10, 9, 2, 5, 6, 7, 10, 9, 2]
  )
  assert list(ids) == ChatFormat(TEMPLATE, HFTokenizer(os.path.join(hf_run["src"], "tokenizer.json"))).encode(MESSAGES)
  assert theirs.eos_token_id == 10 and theirs.pad_token_id == 8
  # generation_config: both EOS ids (a list), the source's other defaults kept
  gen = transformers.GenerationConfig.from_pretrained(hf_out)
  assert gen.eos_token_id == [10, 8] and gen.temperature == 0.7
  # jaxllm reads the export back as the run it came from
  m = load_model(hf_out)
  assert m.eos_ids == (10, 8) and m.chat_template == TEMPLATE
  for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(hf_run["params"])):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bare_tokenizer_json(hf_run, byte_run, tmp_path):
  """A train.tokenizer naming a lone tokenizer.json (any file name, no tokenizer_config.json beside it):
  the export names the special tokens jaxllm guessed, so transformers agrees with jaxllm on them."""
  (tmp_path / "tok").mkdir()
  spec = str(tmp_path / "tok" / "words.json")
  with open(os.path.join(hf_run["src"], "tokenizer.json")) as f, open(spec, "w") as g:
    g.write(f.read())
  ckpt = _save(
    str(tmp_path / "ckpt"), Config(model=CFG, train=TrainConfig(tokenizer=spec)), [(1, byte_run["params"][1])]
  )
  out = export_run(ckpt, str(tmp_path / "out"), log=lambda s: None)
  ours = HFTokenizer(spec)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (None, 8, 8)  # "<|endoftext|>": guessed, pad falls back to eos
  assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (None, 8, 8)
  text = "hello <|im_start|>you are world<|im_end|>"
  assert theirs(text)["input_ids"] == ours.encode(text) == [3, 9, 7, 6, 4, 10]
  _same_chat(theirs, ChatFormat(None, ours))  # no template beside it: jaxllm's default travels
  assert _json(os.path.join(out, "generation_config.json"))["eos_token_id"] == 8 and load_model(out).eos_ids == (8,)


def _same_chat(theirs, chat):
  """transformers' apply_chat_template gives jaxllm's ChatFormat ids, prompt and whole conversation."""
  for prompt in (True, False):
    ids = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=prompt)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == chat.encode(MESSAGES, add_generation_prompt=prompt)


def test_byte_tokenizer_equals_jaxllm(byte_out):
  """The built tokenizer.json encodes every code point (every UTF-8 lead and continuation byte) as
  jaxllm's ByteTokenizer does, the specials' names to their ids, decodes any ids (broken UTF-8 included)
  alike, and carries jaxllm's default chat template with its eos."""
  byte = ByteTokenizer()
  theirs = transformers.AutoTokenizer.from_pretrained(byte_out)
  assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, len(theirs)) == (256, 257, 258, 259)
  with open(os.path.join(byte_out, "tokenizer.json")) as f:
    assert f.read() == byte_tokenizer_json()
  every = "".join(chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000) + "".join(
    chr(c) for c in range(0x10000, 0x110000, 997)
  )
  texts = [every, "", " ", "  a\n\n\tb  \r\n ", "<|bos> <eos|> <s></s>", "héllo wörld 😀 数学 ,  . !"]
  for text in texts:
    assert theirs(text)["input_ids"] == byte.encode(text), text[:40]
    assert theirs(text, add_special_tokens=False)["input_ids"] == byte.encode(text)
  assert theirs("<|bos|>a<|eos|><|pad|>")["input_ids"] == [256, 97, 257, 258]  # names in text: their ids
  _same_chat(theirs, ChatFormat(None, byte))
  rng = np.random.RandomState(0)
  pieces = [0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 0xC3, 0xA9, 0x41, 0xED, 0xA0, 0xFF, 0xC0, 0x80, 256, 257, 258]
  for _ in range(300):
    ids = [int(i) for i in rng.choice(pieces, size=rng.randint(0, 10))] + rng.randint(0, 259, size=3).tolist()
    assert theirs.decode(ids, skip_special_tokens=True) == byte.decode(ids), ids
  gen = _json(os.path.join(byte_out, "generation_config.json"))
  assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (256, 257, 258)
  hf = _json(os.path.join(byte_out, "config.json"))
  assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (256, 257, 258)
  assert load_model(byte_out).eos_ids == (257,)


def test_refusals_are_one_line(byte_run, byte_out, tmp_path):
  from jaxllm.rl.reward_model import KIND

  assert KIND == REWARD_MODEL_KIND
  rm = _save(str(tmp_path / "rm"), Config(model=CFG), [(4, byte_run["params"][1])], {"kind": KIND})
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("mine")
  cases = [
    (rm, tmp_path / "a", {}, ModelLoadError, "is a reward model's checkpoint .* export a pretraining, SFT or RL run"),
    (byte_run["run"], full, {}, FileExistsError, "is not empty; pass an empty or new one, or --force"),
    (byte_run["run"], tmp_path / "b", {"step": 7}, CheckpointError, r"has no step 7; pass one of its steps \[1, 2\]"),
    (tmp_path / "nowhere", tmp_path / "c", {}, CheckpointError, "no such directory; pass a training run's out_dir"),
    (byte_out, tmp_path / "d", {}, ModelLoadError, "is already a Hugging Face model directory"),
    (byte_run["run"], byte_run["run"], {"force": True}, ValueError, "contain one another"),
  ]
  for src, out, kw, error, needle in cases:
    with pytest.raises(error, match=needle) as e:
      export_run(str(src), str(out), **kw)
    assert "\n" not in str(e.value) and (str(src) in str(e.value) or str(out) in str(e.value))
    assert not _siblings(out)
  assert os.listdir(full) == ["keep.txt"] and os.path.isdir(os.path.join(byte_run["run"], "checkpoints", "2"))
  # an export that fails once writing leaves the old directory as it was and no temporary one
  with pytest.raises(ValueError, match="cannot export this jaxllm model as Qwen2ForCausalLM"):
    export_run(byte_run["run"], str(full), force=True, architecture="Qwen2ForCausalLM")
  assert os.listdir(full) == ["keep.txt"] and not _siblings(full)
  # --force replaces it once the new one is complete
  export_run(byte_run["run"], str(full), step=1, force=True, log=lambda s: None)
  assert "keep.txt" not in os.listdir(full) and "config.json" in os.listdir(full) and not _siblings(full)


def _safetensors_dtypes(out):
  """{tensor name: dtype} from the safetensors headers (bfloat16 has no numpy dtype to load into)."""
  dtypes = {}
  for name in os.listdir(out):
    if name.endswith(".safetensors"):
      with open(os.path.join(out, name), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
      dtypes.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
  return dtypes


def test_command_line(byte_run, tmp_path, capsys):
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "jaxllm.io.export", byte_run["run"], str(out)]
  cmd += ["--step", "1", "--dtype", "bfloat16", "--max-shard-size", "100KB"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "step 1" in r.stdout and "byte-level tokenizer.json" in r.stdout and "eos_token_id 257" in r.stdout
  assert "Warning" not in r.stderr, r.stderr
  files = os.listdir(out)
  assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
  assert set(_safetensors_dtypes(out).values()) == {"BF16"}
  assert _json(out / "config.json")["torch_dtype"] == "bfloat16"
  m = load_model(str(out))
  want = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, m.cfg.param_dtype)), byte_run["params"][1])
  for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(want)):
    assert np.array_equal(np.asarray(a), b)
  # errors: one line on stderr and exit status 2 (in-process: the subprocess above covers `-m`)
  assert main([byte_run["run"], str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and f"output directory {out} is not empty" in err
