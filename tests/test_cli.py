"""One tiny end-to-end run of train.py, as a user would start it, and its plain-words errors."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None):
  env = {**os.environ, **(env or {})}
  env.pop("XLA_FLAGS", None)  # train.py sets the device count itself, as on a user's machine
  return subprocess.run(
    [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
  )


def test_train_py_learns_and_saves(tmp_path):
  out = run(
    "--no-progress",
    "train.steps=40",
    "train.seq_len=64",
    "train.batch_size=8",
    "train.max_corpus_bytes=300000",
    "train.log_every=10",
    "train.eval_every=20",
    "train.sample_tokens=20",
    f"train.out_dir={tmp_path}",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "device   pp   dp   tp  edp   ep  etp" in text  # rank table of the default cpu-8 mesh
  line = next(l for l in text.splitlines() if l.startswith("trained to step 40"))
  first, last = (float(x) for x in line.split("loss ")[1].split(",")[0].split(" -> "))
  assert last < first - 1.0
  assert f"checkpoint: {tmp_path}/checkpoints" in text and "sample:\n" in text
  assert os.path.isdir(tmp_path / "checkpoints" / "40")
  # Options and key=value overrides mix in any order; the checkpoint restores onto a tp=4 mesh.
  again = run(
    "train.steps=40",
    "--mesh",
    "meshes/cpu-8.toml",
    "mesh.tp=4",
    "--no-progress",
    "mesh.dp=2",
    "train.seq_len=64",
    "train.batch_size=8",
    "train.max_corpus_bytes=300000",
    "train.sample_tokens=0",
    f"train.out_dir={tmp_path}",
  )
  assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-3000:]
  assert "tp=(" in again.stdout and "resumed from" in again.stdout
  # A mistyped override beside an existing run: one plain line, nothing else (the config is checked
  # before the checkpoint manager starts its threads), and the run's files stay as they were.
  before = sorted(os.listdir(tmp_path / "checkpoints")), open(tmp_path / "metrics.jsonl").read()
  bad = run("model.n_heads=5", f"train.out_dir={tmp_path}")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
    next(l for l in bad.stderr.splitlines() if l.startswith("error: model.n_heads=5 does not divide"))
  ], bad.stderr
  assert (sorted(os.listdir(tmp_path / "checkpoints")), open(tmp_path / "metrics.jsonl").read()) == before


def test_train_py_errors_in_plain_words(tmp_path):
  out = run("model.n_heads=5")
  assert out.returncode == 2 and "error: model.n_heads=5 does not divide model.d_model=128" in out.stderr
  out = run("--mesh", "meshes/nope.toml")
  assert out.returncode == 2 and "does not exist" in out.stderr
  assert "Traceback" not in out.stderr


def test_train_py_init_from_hf(tmp_path):
  # A Hugging Face directory written by our exporter (no torch needed) starts a training run.
  from jaxllm.config import ModelConfig
  from jaxllm.io import export_hf
  from jaxllm.model.params import init_params

  cfg = ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
  export_hf(init_params(cfg, 3), cfg, str(tmp_path / "hf"), architecture="LlamaForCausalLM")
  out = run(
    "--no-progress",
    "--init-from-hf",
    str(tmp_path / "hf"),
    "--mesh",
    "meshes/cpu-1.toml",
    "train.steps=3",
    "train.seq_len=32",
    "train.batch_size=4",
    "train.max_corpus_bytes=100000",
    "train.eval_every=0",
    "train.sample_tokens=0",
    f"train.out_dir={tmp_path / 'run'}",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "initialised from Hugging Face checkpoint" in out.stdout and "trained to step 3" in out.stdout


def test_compile_cache_setting(monkeypatch, tmp_path):
  import jax

  from jaxllm import cli as C

  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path / "xla"))
    assert C.enable_compile_cache() == str(tmp_path / "xla") == jax.config.jax_compilation_cache_dir
    assert (tmp_path / "xla").is_dir()
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", "")
    assert C.enable_compile_cache() is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere")
    assert C.enable_compile_cache() == "/somewhere"
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_tune_malloc_reexec(tmp_path):
  """cli.tune_malloc re-runs the same command once with the malloc tunables added to the ones
  already set (where the machine can use it), with the arguments intact; JAXLLM_TUNE_MALLOC=0 opts out."""
  from jaxllm import cli

  probe = tmp_path / "probe.py"
  probe.write_text(
    f"import os, sys\nsys.path.insert(0, {ROOT!r})\nfrom jaxllm import cli\nprint('start')\n"
    "cli.tune_malloc()\nprint(sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))\n"
  )
  env = {**os.environ, "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=0"}
  env.pop("JAXLLM_TUNE_MALLOC", None)
  out = subprocess.run([sys.executable, str(probe), "a b", "x=1"], capture_output=True, text=True, env=env, timeout=60)
  assert out.returncode == 0, out.stderr
  if cli.malloc_tunable():
    assert out.stdout.splitlines() == [
      "start",
      "start",
      f"['a b', 'x=1'] glibc.rtld.optional_static_tls=0:{cli.MALLOC_TUNABLES}",
    ]
  else:
    assert out.stdout.splitlines() == ["start", "['a b', 'x=1'] glibc.rtld.optional_static_tls=0"]
  off = subprocess.run(
    [sys.executable, str(probe)], capture_output=True, text=True, timeout=60, env={**env, "JAXLLM_TUNE_MALLOC": "0"}
  )
  assert off.stdout.splitlines() == ["start", "[] glibc.rtld.optional_static_tls=0"]


def test_cpu_device_count_follows_mesh_overrides(monkeypatch):
  """`--mesh meshes/cpu-1.toml mesh.tp=2 mesh.dp=3` asks for 6 emulated CPU devices before jax starts."""
  from jaxllm import cli

  monkeypatch.delenv("XLA_FLAGS", raising=False)
  cli.prepare_devices(os.path.join(ROOT, "meshes", "cpu-1.toml"), ["mesh.tp=2", "train.steps=1", "mesh.dp=3"])
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=6"
