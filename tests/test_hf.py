"""Hugging Face interop: logit parity with transformers, export round trips, tokenizers, CLIs.

The fixtures under tests/fixtures/hf/ were written by tools/make_hf_fixtures.py with torch and
transformers (which this suite does not need): tiny random models and the float32 logits
transformers computed for fixed inputs. That script also checks that transformers loads what
save_pretrained writes with the same logits; here the export is checked against the files
transformers itself wrote.
"""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from configs import base
from lm import checkpoint as ckpt_lib
from lm import config as lm_config
from lm import data as lm_data
from lm import evaluate
from lm import hf
from lm import model as lm_model
from lm import train
from lm.model import positions
from lm.data import tokenizers
from tests import trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'hf')
CASES = ('gpt2', 'llama_gqa', 'llama_mqa_tied', 'llama3_rope', 'mistral_sliding', 'mixtral')
TOLERANCE = 1e-4


def fixture(case: str) -> str:
  return os.path.join(FIXTURES, case)


def reference(case: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(fixture(case), 'reference.npz')) as f:
    return dict(f)


def logits(model, params, ref) -> np.ndarray:
  return np.asarray(model.apply({'params': params}, ref['input_ids'], ref['position_ids']))


def tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory, shards merged."""
  found = {}
  for path in sorted(glob.glob(os.path.join(directory, '*.safetensors'))):
    found.update(safetensors_numpy.load_file(path))
  return found


def copy_case(case: str, tmp_path) -> str:
  directory = os.path.join(str(tmp_path), case)
  shutil.copytree(fixture(case), directory)
  return directory


def edit_config(directory: str, **changes) -> None:
  path = os.path.join(directory, 'config.json')
  with open(path) as f:
    config = json.load(f)
  for key, value in changes.items():
    if value is None:
      config.pop(key, None)
    else:
      config[key] = value
  with open(path, 'w') as f:
    json.dump(config, f)


# ---------------------------------------------------------------------------------------------
# Parity with transformers.


@pytest.mark.parametrize('scan_layers', [False, True], ids=['unrolled', 'scanned'])
@pytest.mark.parametrize('case', CASES)
def test_logits_match_transformers(case, scan_layers):
  model, params, model_config = hf.load_pretrained(fixture(case), scan_layers=scan_layers)
  ref = reference(case)
  got = logits(model, params, ref)
  assert got.dtype == np.float32 and got.shape == ref['logits'].shape
  assert np.max(np.abs(got - ref['logits'])) <= TOLERANCE
  assert model_config.scan_layers == scan_layers
  assert ('layers' in params) == scan_layers


def test_what_each_case_exercises():
  """The cases differ from plain Llama where they say they do, and those differences matter."""
  configs = {case: hf.read_config(fixture(case)) for case in CASES}
  assert configs['gpt2'].pos_emb == 'learned' and configs['gpt2'].tie_embeddings
  assert configs['gpt2'].use_bias and configs['gpt2'].norm == 'layernorm'
  assert (configs['llama_gqa'].num_heads, configs['llama_gqa'].num_kv_heads) == (8, 2)
  assert not configs['llama_gqa'].tie_embeddings
  mqa = configs['llama_mqa_tied']
  assert mqa.num_kv_heads == 1 and mqa.tie_embeddings and mqa.use_bias
  rope = configs['llama3_rope']
  assert rope.rope_scaling == 'llama3' and rope.head_dim * rope.num_heads != rope.d_model
  assert configs['mistral_sliding'].attention_window == 4
  assert reference('mistral_sliding')['input_ids'].shape[1] > 4
  assert (configs['mixtral'].num_experts, configs['mixtral'].top_k) == (4, 2)
  # Without the sliding window or the rope scaling, the logits move far past the tolerance.
  for case, change in (('mistral_sliding', dict(attention_window=0)),
                       ('llama3_rope', dict(rope_scaling='none'))):
    model_config = dataclasses.replace(configs[case], **change)
    params = hf.load_params(fixture(case), model_config)
    model = lm_model.Transformer(model_config)
    ref = reference(case)
    assert np.max(np.abs(logits(model, params, ref) - ref['logits'])) > 100 * TOLERANCE


def test_bfloat16_parameters():
  _, params, model_config = hf.load_pretrained(fixture('llama_gqa'), param_dtype='bfloat16',
                                               dtype='bfloat16')
  assert {x.dtype.name for x in jax.tree.leaves(params)} == {'bfloat16'}
  assert model_config.dtype == 'bfloat16'


# ---------------------------------------------------------------------------------------------
# Export.


@pytest.mark.parametrize('case', CASES)
def test_save_writes_what_transformers_wrote_and_loads_back_exactly(case, tmp_path):
  _, params, model_config = hf.load_pretrained(fixture(case))
  out = str(tmp_path / 'out')
  hf.save_pretrained(model_config, params, out)
  written = tensors(out)
  original = tensors(fixture(case))
  assert sorted(written) == sorted(original)
  for name, tensor in original.items():
    np.testing.assert_array_equal(written[name], tensor, err_msg=name)
  assert hf.read_config(out) == model_config
  _, again, _ = hf.load_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_save_shards_with_an_index_and_from_scanned_layers(tmp_path):
  _, params, model_config = hf.load_pretrained(fixture('mixtral'), scan_layers=True)
  out = str(tmp_path / 'out')
  hf.save_pretrained(model_config, params, out, max_shard_bytes=50_000)
  shards = sorted(glob.glob(os.path.join(out, 'model-*-of-*.safetensors')))
  assert len(shards) > 2 and not os.path.exists(os.path.join(out, hf.WEIGHTS_FILE))
  with open(os.path.join(out, hf.INDEX_FILE)) as f:
    index = json.load(f)
  assert sorted(set(index['weight_map'].values())) == [os.path.basename(s) for s in shards]
  original = tensors(fixture('mixtral'))
  assert sorted(tensors(out)) == sorted(original)
  # Saving again unsharded replaces the shards rather than leaving both.
  hf.save_pretrained(model_config, params, out)
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  ref = reference('mixtral')
  model, again, _ = hf.load_pretrained(out)
  assert np.max(np.abs(logits(model, again, ref) - ref['logits'])) <= TOLERANCE


def test_ntk_scaling_exports_as_the_larger_base(tmp_path):
  _, params, model_config = hf.load_pretrained(fixture('llama_gqa'))
  ntk = dataclasses.replace(model_config, rope_scaling='ntk', rope_scaling_factor=4.0)
  out = str(tmp_path / 'out')
  hf.save_pretrained(ntk, params, out)
  with open(os.path.join(out, hf.CONFIG_FILE)) as f:
    written = json.load(f)
  assert written['rope_scaling'] is None and written['rope_theta'] > model_config.rope_theta
  np.testing.assert_array_equal(positions.rope_frequencies(hf.read_config(out)),
                                positions.rope_frequencies(ntk))


def test_save_refuses_what_no_family_expresses(tmp_path):
  model_config = hf.read_config(fixture('gpt2'))
  for change, key in ((dict(pos_emb='alibi'), 'pos_emb'), (dict(num_kv_heads=2), 'num_kv_heads'),
                      (dict(qk_norm=True), 'qk_norm'), (dict(norm='rmsnorm'), 'norm'),
                      (dict(attention_pattern='fixed', attention_stride=8), 'attention_pattern')):
    with pytest.raises(ValueError, match=f'model.{key}='):
      hf.export_family(dataclasses.replace(model_config, **change))
  llama = hf.read_config(fixture('llama_gqa'))
  with pytest.raises(ValueError, match='model.use_bias=True cannot be saved as a Hugging Face '
                     'mistral'):
    hf.export_family(dataclasses.replace(llama, attention_window=8, use_bias=True))
  _, params, _ = hf.load_pretrained(fixture('gpt2'))
  with pytest.raises(ValueError, match='d_model|shape'):
    hf.save_pretrained(dataclasses.replace(model_config, d_ff=64), params, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts transformers may also produce.


def test_transformers_4_config_reads_the_same(tmp_path):
  directory = copy_case('llama3_rope', tmp_path)
  with open(os.path.join(directory, 'config.json')) as f:
    scaling = json.load(f)['rope_parameters']
  theta = scaling.pop('rope_theta')
  edit_config(directory, rope_parameters=None, rope_theta=theta, rope_scaling=scaling)
  assert hf.read_config(directory) == hf.read_config(fixture('llama3_rope'))


def test_bare_model_names_and_buffers(tmp_path):
  """GPT2Model checkpoints (as on the Hub): no 'transformer.' prefix, causal-mask buffers."""
  directory = copy_case('gpt2', tmp_path)
  stored = {name[len('transformer.'):]: t for name, t in tensors(directory).items()}
  stored['h.0.attn.bias'] = np.ones((1, 1, 64, 64), np.float32)
  safetensors_numpy.save_file(stored, os.path.join(directory, hf.WEIGHTS_FILE))
  _, params, _ = hf.load_pretrained(directory)
  _, expected, _ = hf.load_pretrained(fixture('gpt2'))
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_fused_experts_of_transformers_5(tmp_path):
  """Experts stacked [E, ...] with gate and up fused, as transformers 5 holds them in memory."""
  directory = copy_case('mixtral', tmp_path)
  stored = tensors(directory)
  for i in range(2):
    moe, mlp = f'model.layers.{i}.block_sparse_moe.', f'model.layers.{i}.mlp.'
    w = {k: np.stack([stored.pop(f'{moe}experts.{e}.{k}.weight') for e in range(4)])
         for k in ('w1', 'w2', 'w3')}
    stored[mlp + 'experts.gate_up_proj'] = np.concatenate([w['w1'], w['w3']], axis=1)
    stored[mlp + 'experts.down_proj'] = w['w2']
    stored[mlp + 'gate.weight'] = stored.pop(moe + 'gate.weight')
  safetensors_numpy.save_file(stored, os.path.join(directory, hf.WEIGHTS_FILE))
  _, params, _ = hf.load_pretrained(directory)
  _, expected, _ = hf.load_pretrained(fixture('mixtral'))
  jax.tree.map(np.testing.assert_array_equal, params, expected)


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('changes, match', [
    (dict(model_type='bert', architectures=['BertModel']),
     "model_type 'bert'.*not supported. lm imports gpt2 \\(GPT2LMHeadModel\\), llama"),
    (dict(architectures=['LlamaForSequenceClassification']),
     "architecture 'LlamaForSequenceClassification' is not supported.*MixtralForCausalLM"),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1e4}),
     "rope_scaling=.*yarn.*lm supports rope_type default, linear, llama3"),
    (dict(rope_parameters={'rope_type': 'linear', 'factor': 2.0, 'attention_factor': 2.0}),
     "rope_scaling.attention_factor=2.0 is not supported"),
    (dict(hidden_act='gelu'), "hidden_act='gelu' is not supported for llama.*'silu'"),
    (dict(attention_bias=True), "mlp_bias=False.*attention_bias == mlp_bias"),
    (dict(is_encoder_decoder=True), "is_encoder_decoder=True is not supported"),
    (dict(layer_types=['full_attention'] * 2), "key 'layer_types'.*is unknown to lm"),
    (dict(num_attention_heads=3), "num_heads=3 is not divisible by num_kv_heads=2"),
])
def test_config_fields_lm_cannot_honour_are_errors(tmp_path, changes, match):
  directory = copy_case('llama_gqa', tmp_path)
  edit_config(directory, **changes)
  with pytest.raises(ValueError, match=match):
    hf.read_config(directory)


def test_overrides_are_limited_to_what_config_json_does_not_decide():
  with pytest.raises(ValueError, match='model.d_model is fixed by the checkpoint'):
    hf.read_config(fixture('gpt2'), d_model=64)
  with pytest.raises(ValueError, match='scan_layer is not a model config key. Did you mean '
                     'scan_layers'):
    hf.read_config(fixture('gpt2'), scan_layer=True)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json does not exist'):
    hf.load_pretrained(str(tmp_path / 'nowhere'))
  directory = copy_case('gpt2', tmp_path)
  os.remove(os.path.join(directory, hf.WEIGHTS_FILE))
  with pytest.raises(FileNotFoundError, match='No model.safetensors or '
                     'model.safetensors.index.json'):
    hf.load_pretrained(directory)
  open(os.path.join(directory, 'pytorch_model.bin'), 'wb').close()
  with pytest.raises(FileNotFoundError, match='pytorch_model.bin, but lm reads safetensors'):
    hf.load_pretrained(directory)
  sharded = copy_case('mistral_sliding', tmp_path)
  os.remove(os.path.join(sharded, 'model-00002-of-00003.safetensors'))
  with pytest.raises(FileNotFoundError, match='model-00002-of-00003.safetensors is listed in'):
    hf.load_pretrained(sharded)


def test_corrupt_safetensors(tmp_path):
  directory = copy_case('llama_gqa', tmp_path)
  path = os.path.join(directory, hf.WEIGHTS_FILE)
  with open(path, 'rb') as f:
    content = f.read()
  with open(path, 'wb') as f:
    f.write(content[:len(content) // 2])  # truncated
  with pytest.raises(ValueError, match='not a readable safetensors file.*corrupt or truncated'):
    hf.load_pretrained(directory)
  with open(path, 'wb') as f:
    f.write(b'not a safetensors file at all')
  with pytest.raises(ValueError, match='not a readable safetensors file'):
    hf.load_pretrained(directory)


def test_tensors_that_disagree_with_the_config(tmp_path):
  directory = copy_case('llama_gqa', tmp_path)
  edit_config(directory, intermediate_size=128)
  with pytest.raises(ValueError, match=r'Tensor model.layers.0.mlp.gate_proj.weight has shape '
                     r'\(96, 64\) in .*, but config.json implies \(128, 64\)'):
    hf.load_pretrained(directory)

  directory = copy_case('llama_mqa_tied', tmp_path)
  path = os.path.join(directory, hf.WEIGHTS_FILE)
  stored = tensors(directory)
  removed = stored.pop('model.layers.1.self_attn.k_proj.bias')
  safetensors_numpy.save_file(stored, path)
  with pytest.raises(ValueError, match=r'Tensor model.layers.1.self_attn.k_proj.bias \(8,\) is '
                     'missing'):
    hf.load_pretrained(directory)
  stored['model.layers.1.self_attn.k_proj.bias'] = removed
  stored['model.layers.2.mlp.up_proj.weight'] = np.zeros((64, 32), np.float32)
  safetensors_numpy.save_file(stored, path)
  with pytest.raises(ValueError, match='model.layers.2.mlp.up_proj.weight in .* has no place'):
    hf.load_pretrained(directory)
  stored.pop('model.layers.2.mlp.up_proj.weight')
  stored['model.norm.weight'] = stored['model.norm.weight'].astype(np.int32)
  safetensors_numpy.save_file(stored, path)
  with pytest.raises(ValueError, match='stored as I32.*Dequantize'):
    hf.load_pretrained(directory)


# ---------------------------------------------------------------------------------------------
# Tokenizers that come with a checkpoint.


def test_tokenizer_json(tmp_path):
  tokenizer = lm_data.load_tokenizer(fixture('gpt2'))
  assert isinstance(tokenizer, tokenizers.HFTokenizer)
  assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.name) == (300, 0, 'hf-300')
  text = 'Beautiful is better than ugly. Ünïcödé too\n'
  ids = tokenizer.encode(text)
  assert tokenizer.eos_id not in ids and tokenizer.decode(ids) == text
  assert [list(x) for x in tokenizer.encode_batch([text.encode()])] == [ids]
  # Saved into a run's folder and loaded back: the same ids, the same cache key.
  tokenizer.save(str(tmp_path / 'tokenizer'))
  again = lm_data.load_tokenizer(str(tmp_path))
  assert isinstance(again, tokenizers.HFTokenizer) and again.encode(text) == ids
  assert again.fingerprint == tokenizer.fingerprint and again.eos_id == 0
  assert not tokenizers.has_hf_tokenizer(str(tmp_path / 'tokenizer'))


def test_tokenizer_model_and_special_tokens(tmp_path):
  tokenizer = lm_data.load_tokenizer(fixture('llama_gqa'))
  assert isinstance(tokenizer, tokenizers.SentencePieceTokenizer)
  assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id) == (384, 2, 1)
  # tokenizer_config.json's named tokens come first, config.json's ids after.
  directory = copy_case('gpt2', tmp_path)
  with open(os.path.join(directory, 'tokenizer.json')) as f:
    token_of = {i: token for token, i in json.load(f)['model']['vocab'].items()}
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'eos_token': {'content': token_of[280], 'special': False},
               'pad_token': token_of[290]}, f)
  tokenizer = lm_data.load_tokenizer(directory)
  assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id) == (280, 290, 0)
  for name in ('tokenizer_config.json', 'config.json', 'generation_config.json'):
    os.remove(os.path.join(directory, name))
  with pytest.raises(ValueError, match='names no EOS token.*Add "eos_token_id"'):
    lm_data.load_tokenizer(directory)
  os.remove(os.path.join(directory, 'tokenizer.json'))
  with pytest.raises(FileNotFoundError, match='No tokenizer at'):
    lm_data.load_tokenizer(directory)
  with pytest.raises(FileNotFoundError, match='holds no tokenizer'):
    tokenizers.load_hf_tokenizer(directory)


# ---------------------------------------------------------------------------------------------
# Eval, sample and fine-tuning.


def run_config_dict(tmp_path, **train_values):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(trained_run.corpus_text(200))
  c = base.get_config()
  c.data.update(corpus=str(corpus), seq_len=16, prefetch=0, cache_dir=str(tmp_path / 'cache'),
                val_fraction=0.2)
  c.train.update(steps=2, batch_size=8, log_every=1, **train_values)
  c.optim.update(warmup_steps=1)
  c.checkpoint.update(every=2, async_save=False)
  c.eval.update(batch_size=8)
  c.sample.update(max_new_tokens=6, temperature=0.0)
  return c


def test_evaluate_hf_uses_the_checkpoints_model_and_tokenizer(tmp_path):
  config = lm_config.Config.from_config_dict(run_config_dict(tmp_path))
  workdir = str(tmp_path / 'workdir')
  result = evaluate.evaluate_hf(fixture('gpt2'), config=config, workdir=workdir)
  assert result['step'] == 'hf' and result['tokenizer'] == 'hf-300'
  assert result['checkpoint'] == fixture('gpt2')
  assert np.isfinite(result['loss']) and result['tokens'] > 0
  with open(os.path.join(workdir, 'eval', 'hf.json')) as f:
    assert json.load(f)['loss'] == result['loss']
  assert not os.path.exists(os.path.join(workdir, 'tokenizer'))


def test_finetune_from_hf(tmp_path):
  config = lm_config.Config.from_config_dict(
      run_config_dict(tmp_path, init_from=f'hf:{fixture("gpt2")}'))
  assert train.parse_init_from(config.train.init_from) == (fixture('gpt2'), 'hf')
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  finetune = hf.finetune_config(config, fixture('gpt2'), workdir)
  expected = hf.read_config(fixture('gpt2'), **{k: getattr(config.model, k)
                                                for k in hf.RUNTIME_KEYS + hf.TRAINING_KEYS})
  assert finetune.model == expected and finetune.model.resid_dropout == 0.0  # the config's
  checkpointer = ckpt_lib.Checkpointer(workdir, finetune.checkpoint)
  state, resumed = train._initial_state(finetune, checkpointer)  # pylint: disable=protected-access
  checkpointer.close()
  assert not resumed
  jax.tree.map(np.testing.assert_array_equal, state.params,
               hf.load_params(fixture('gpt2'), finetune.model))
  result = train.train(config, workdir, progress=False)
  assert np.isfinite(result['eval/loss'])
  assert isinstance(lm_data.load_tokenizer(workdir), tokenizers.HFTokenizer)
  saved = ckpt_lib.load_config(workdir)
  assert saved.model == finetune.model


def cli(tmp_path, *args):
  c = run_config_dict(tmp_path)
  config_file = tmp_path / 'config.py'
  overrides = ''.join(f'  c.{section}.update({dict(c[section])!r})\n'
                      for section in ('data', 'eval', 'sample'))
  config_file.write_text('from configs import base\n\n\ndef get_config(arg=None):\n'
                         f'  c = base.get_config()\n{overrides}  return c\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  command = [sys.executable, 'run.py', f'--config={config_file}',
             f'--workdir={tmp_path / "workdir"}', *args]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_eval_and_sample(tmp_path):
  done = cli(tmp_path, '--mode=eval', f'--hf={fixture("gpt2")}')
  assert done.returncode == 0, done.stderr
  assert 'step hf: loss' in done.stdout
  assert os.path.isfile(tmp_path / 'workdir' / 'eval' / 'hf.json')
  done = cli(tmp_path, '--mode=sample', f'--hf={fixture("llama_gqa")}', '--prompt=Beautiful')
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith('Beautiful') and f'Sampling from {fixture("llama_gqa")}' in (
      done.stderr)
  done = cli(tmp_path, '--mode=sample', f'--hf={fixture("llama_mqa_tied")}')
  assert done.returncode != 0 and 'holds no tokenizer' in done.stderr
  done = cli(tmp_path, '--mode=eval', f'--hf={fixture("gpt2")}', '--step=3')
  assert done.returncode != 0 and 'Drop --step' in done.stderr
