"""DPO: the loss against a hand computation, the reference model (copy or LoRA's adapters off),
the step on pairs [B, 2, T] across devices and micro-batches, and a run that resumes exactly."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoint
from lm import dpo
from lm import metrics
from lm import parallel
from lm import train
from tests import train_fakes
from tests import trained_run

STEP = jax.jit(train.train_step)
PAIRS = 8


def dpo_config(**overrides):
  return train_fakes.tiny_config(data__format='preference', data__corpus='pairs.jsonl',
                                 **overrides)


def with_lora(config, rank=4):
  lora = dataclasses.replace(config.model.lora, rank=rank)
  return dataclasses.replace(config, model=dataclasses.replace(config.model, lora=lora))


def pair_batch(step, pairs=PAIRS):
  """Pairs sharing a prompt (the first half of the row); chosen responses continue it with the
  fake language's rule (odd tokens = predecessor + 1), rejected ones are noise."""
  rng = np.random.default_rng([7, step])
  T = train_fakes.SEQ_LEN  # pylint: disable=invalid-name
  tokens = rng.integers(1, train_fakes.VOCAB, (pairs, 2, T + 1)).astype(np.int32)
  tokens[:, 1, :T // 2] = tokens[:, 0, :T // 2]
  tokens[:, 0, 1::2] = tokens[:, 0, 0:-1:2] % (train_fakes.VOCAB - 1) + 1
  weights = np.zeros((pairs, 2, T), np.float32)
  weights[:, :, T // 2:] = 1.0
  return {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:], 'weights': weights}


def test_dpo_loss_equals_a_hand_computation():
  logp_Bx2 = jnp.array([[-1.0, -3.0], [-2.0, -1.5]])
  ref_logp_Bx2 = jnp.array([[-1.5, -2.5], [-2.0, -2.0]])
  loss_B, reward_Bx2 = dpo.dpo_loss(logp_Bx2, ref_logp_Bx2, beta=0.5)
  # rewards 0.5 * (logp - ref): pair 0 (0.25, -0.25), pair 1 (0, 0.25)
  np.testing.assert_allclose(reward_Bx2, [[0.25, -0.25], [0.0, 0.25]])
  np.testing.assert_allclose(loss_B, [math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.25))],
                             rtol=1e-6)
  sums = dpo.pair_sums(loss_B, reward_Bx2, jnp.array([1.0, 1.0]))
  assert float(sums['reward_accuracy_sum']) == 1.0
  np.testing.assert_allclose(sums['reward_margin_sum'], 0.5 - 0.25)
  masked = dpo.pair_sums(loss_B, reward_Bx2, jnp.array([1.0, 0.0]))  # a padding pair
  np.testing.assert_allclose(masked['loss_sum'], loss_B[0])


def test_sequence_logprobs_sum_weighted_token_logprobs():
  logits_NxTxV = jax.random.normal(jax.random.key(0), (2, 3, 5))
  targets_NxT = jnp.array([[1, 2, 3], [4, 0, 1]])
  weights_NxT = jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
  logp_NxTxV = jax.nn.log_softmax(logits_NxTxV)
  expected = [logp_NxTxV[0, 1, 2] + logp_NxTxV[0, 2, 3], logp_NxTxV[1, 0, 4]]
  np.testing.assert_allclose(dpo.sequence_logprobs(logits_NxTxV, targets_NxT, weights_NxT),
                             expected, rtol=1e-6)


def test_the_loss_is_log_2_when_the_policy_is_the_reference_and_then_falls():
  state = train.create_state(dpo_config(train__dpo_beta=0.5))
  assert state.options.objective == 'dpo' and state.options.dpo_reference == 'copy'
  reference = jax.device_get(state.ref_params)
  state, m = STEP(state, pair_batch(0))
  np.testing.assert_allclose(float(m['loss']), math.log(2), rtol=1e-6)
  assert float(m['reward_margin']) == 0.0 and float(m['reward_accuracy']) == 0.0
  assert float(m['tokens']) == 2 * PAIRS * train_fakes.SEQ_LEN // 2
  for step in range(1, 30):
    state, m = STEP(state, pair_batch(step))
  assert float(m['loss']) < 0.6 * math.log(2) and float(m['reward_accuracy']) >= 0.75
  assert float(m['chosen_reward']) > float(m['rejected_reward'])
  # The reference never moved, and holds no optimizer state: the optimizer sees params alone.
  train_fakes.assert_trees_equal(jax.device_get(state.ref_params), reference)
  plain = train.create_state(train_fakes.tiny_config())
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(plain.opt_state)
  assert plain.ref_params is None


def test_pairs_split_over_devices_and_micro_batches_give_the_same_step():
  """Pairs ride the batch axis: any split of it (pmap, a sharded mesh whose reference params
  are sharded like the params, micro-batches) keeps each pair whole."""
  batch = train._stack([pair_batch(s) for s in range(2)])  # pylint: disable=protected-access
  steps = jax.jit(train.train_steps)
  _, one = steps(train.create_state(dpo_config()), batch)
  _, accumulated = steps(train.create_state(dpo_config(train__grad_accum=4)), batch)
  results = [accumulated]
  for config in (dpo_config(), dpo_config(parallel__strategy='mesh', parallel__mesh_data=2,
                                          parallel__mesh_fsdp=2)):
    strategy = parallel.make(config, jax.local_devices()[:4])
    state = strategy.init(lambda p, c=config, s=strategy: train.create_state(
        c, p, axis_name=s.axis_name))
    compiled = strategy.compile(train.train_steps, state=state)
    results.append(strategy.first(compiled(state, strategy.shard(batch, batch_axis=1))[1]))
  for result in results:
    for key in ('loss', 'reward_accuracy', 'reward_margin', 'grad_norm', 'tokens'):
      np.testing.assert_allclose(result[key], one[key], rtol=2e-5, atol=1e-6)


def test_lora_reference_switches_adapters_off_without_copying_the_base():
  kernel, lora_a, lora_b = jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.full((2, 4), 3.0)
  params = {'attn': {'query': {'kernel': kernel, 'lora_a': lora_a, 'lora_b': lora_b}}}
  assert dpo.has_adapters(params) and not dpo.has_adapters({'kernel': kernel})
  reference = dpo.adapters_off(params)['attn']['query']
  assert reference['kernel'] is kernel and reference['lora_a'] is lora_a  # the same arrays
  assert not reference['lora_b'].any()
  with pytest.raises(ValueError, match=r'adapter attn/query/lora_b is not zero.*--mode=merge'):
    dpo.check_reference_start(params)


def test_lora_dpo_allocates_no_reference_copy():
  config = with_lora(dpo_config())
  state = train.create_state(config)
  assert state.ref_params is None and state.options.dpo_reference == 'adapters_off'
  lm_state = train.create_state(with_lora(train_fakes.tiny_config()))
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  assert nbytes(state) == nbytes(lm_state)
  # Neither does the compiled step take one: its inputs are the state and the batch alone.
  compiled = STEP.lower(state, pair_batch(0)).compile()
  assert compiled.memory_analysis().argument_size_in_bytes == nbytes(state) + nbytes(
      pair_batch(0))
  # The adapters start at zero: the policy is its reference, until the adapters train.
  state, m = STEP(state, pair_batch(0))
  np.testing.assert_allclose(float(m['loss']), math.log(2), rtol=1e-6)
  for step in (1, 2):  # step 0 had learning rate 0 (warmup)
    state, m = STEP(state, pair_batch(step))
  assert float(m['reward_margin']) != 0.0 and float(m['loss']) != pytest.approx(math.log(2))


# ---------------------------------------------------------------------------------------------
# A run.


def write_pairs(path, n=48):
  """Chosen: the successor of a number; rejected: the number itself."""
  with open(path, 'w') as f:
    for i in range(n):
      f.write(json.dumps({'prompt': f'{i} then', 'chosen': f'{i + 1}.', 'rejected': f'{i}.'})
              + '\n')
  return str(path)


def test_dpo_run_logs_rewards_and_resumes_exactly(tmp_path):
  directory = str(tmp_path)
  source = trained_run.train_run(directory)
  sections = dict(
      data=dict(format='preference', corpus=write_pairs(tmp_path / 'pairs.jsonl'), seq_len=64),
      train=dict(init_from=source, steps=6, log_every=2, batch_size=8),
      optim=dict(lr=1e-3, warmup_steps=1, schedule='constant'),  # steps=4 ends no differently
      checkpoint=dict(every=2, keep=5), eval=dict(every=2))
  whole = str(tmp_path / 'whole')
  result = train.train(trained_run.config(directory, **sections), whole, progress=False)
  records = metrics.read(whole)
  np.testing.assert_allclose(records[0]['train/loss'], math.log(2), rtol=0.2)
  for key in ('train/reward_accuracy', 'train/reward_margin', 'eval/reward_accuracy',
              'eval/reward_margin', 'eval/loss'):
    assert key in records[-1], key
  assert 0 <= records[-1]['eval/reward_accuracy'] <= 1 and 'eval/bits_per_byte' not in records[-1]
  # Stopped at step 4 and resumed, the run ends where the uninterrupted one does: the
  # reference (never checkpointed) comes back from train.init_from.
  parts = str(tmp_path / 'parts')
  halfway = dict(sections, train=dict(sections['train'], steps=4))
  train.train(trained_run.config(directory, **halfway), parts, progress=False)
  resumed = train.train(trained_run.config(directory, **sections), parts, progress=False)
  assert resumed['loss'] == pytest.approx(result['loss'], rel=1e-5)
  train_fakes.assert_trees_equal(checkpoint.restore_params(parts, 6)[0],
                                 checkpoint.restore_params(whole, 6)[0])
