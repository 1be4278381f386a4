"""Config loading and validation: every bad input names the key and the fix."""

import json
import subprocess
import sys

import pytest

from jaxllm.config import ConfigError, MeshConfig, ModelConfig, config_from_dict, load_config, save_config


def test_defaults_and_presets():
  cfg = load_config([], ["model=tiny-moe", "train.steps=7", "mesh.dp=2", "model.n_layers=2"])
  assert cfg.model.n_experts == 8 and cfg.model.n_layers == 2 and cfg.train.steps == 7 and cfg.mesh.dp == 2


def test_toml_and_round_trip(tmp_path):
  p = tmp_path / "c.toml"
  p.write_text('[model]\npreset = "tiny"\nd_model = 64\n[train]\nlr = 1e-3\ndata = ["a.txt", "b.jsonl"]\n')
  cfg = load_config([str(p)], ["train.lr=2e-3"])
  assert cfg.model.d_model == 64 and cfg.train.lr == 2e-3 and cfg.train.data == ("a.txt", "b.jsonl")
  save_config(cfg, tmp_path / "out.json")
  assert config_from_dict(json.loads((tmp_path / "out.json").read_text())) == cfg


@pytest.mark.parametrize(
  "overrides,fragment",
  [
    (["model.d_modle=3"], "did you mean model.d_model"),
    (["train.steps=abc"], "train.steps expects int"),
    (["model.n_heads=3"], "does not divide model.d_model"),
    (["model.n_kv_heads=3"], "must divide model.n_heads"),
    (["model=nope"], "unknown model preset"),
    (["steps=3"], "section.key=value"),
    (["foo.bar=1"], "unknown section"),
    (["model.n_layers=3", "mesh.pp=2", "mesh.microbatches=2"], "divisible by mesh.pp\\*mesh.vpp"),
    (["mesh.dp=3"], "divisible by mesh.dp=3"),
    (["mesh.pp=2"], "microbatches"),
    (["model.dtype=fp8"], "model.dtype"),
    (["train.batch_size=10", "train.grad_accum=3"], "multiple of train.grad_accum"),
  ],
)
def test_bad_configs_are_clear(overrides, fragment):
  with pytest.raises(ConfigError, match=fragment):
    load_config([], overrides)


def test_bad_toml(tmp_path):
  p = tmp_path / "bad.toml"
  p.write_text("[model\n")
  with pytest.raises(ConfigError, match="not valid TOML"):
    load_config([str(p)])
  p.write_text("[modle]\nd_model = 4\n")
  with pytest.raises(ConfigError, match="unknown section"):
    load_config([str(p)])
  with pytest.raises(ConfigError, match="does not exist"):
    load_config([str(tmp_path / "missing.toml")])


def test_mesh_folding_validation():
  assert MeshConfig(dp=4, tp=2, ep=4).edp == 2
  with pytest.raises(ConfigError, match="must divide dp\\*tp"):
    MeshConfig(dp=2, tp=2, ep=8)


def test_help_documents_every_key():
  out = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, check=True).stdout
  for cls, section in ((ModelConfig, "model"), (MeshConfig, "mesh")):
    for name in cls.__dataclass_fields__:
      assert f"{section}.{name}=" in out, name
  assert "train.out_dir=" in out and "train.init_from_hf=" in out


def test_help_lists_every_field_of_every_section():
  """A field documented on more than one line (as a formatter may wrap it) drops out of --help: every
  field of every section keeps `name: type = default  # comment` on one line."""
  import dataclasses

  from jaxllm import cli
  from jaxllm.config import SECTIONS

  text = cli.config_help(tuple(SECTIONS))
  missing = [
    f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f"  {s}.{f.name}=" not in text
  ]
  assert not missing, f"fields missing from --help (keep each on one line with its comment): {missing}"
