"""SFT: chat templates, JSONL errors, the response-only loss mask, packing, and fine-tuning."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from lm import checkpoint
from lm import config as lm_config
from lm import data as lm_data
from lm import evaluate
from lm import metrics
from lm import train
from lm.data import chat
from lm.data import examples
from lm.data import tokenizers
from tests import trained_run

HF_GPT2 = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf', 'gpt2')
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
          "{% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
          "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATION = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hi'},
                {'role': 'assistant', 'content': 'hello'}, {'role': 'user', 'content': 'bye'},
                {'role': 'assistant', 'content': 'ciao'}]


def write_jsonl(path, records):
  with open(path, 'w') as f:
    for record in records:
      f.write((record if isinstance(record, str) else json.dumps(record)) + '\n')
  return str(path)


def qa_records(n=40):
  """Prompts and responses of a learnable toy task (the successor of a number)."""
  return [{'prompt': f'{i} then', 'response': f'{i + 1}.'} for i in range(n)]


def sft_config(directory, corpus, **data):
  """The tiny run's config on SFT examples (64 tokens: the builtin markers take 24 bytes)."""
  return trained_run.config(str(directory), data=dict(
      dict(format='sft', corpus=corpus, seq_len=64), **data))


def response_text(tokenizer, targets_T, weights_T):
  return tokenizer.decode([t for t, w in zip(targets_T, weights_T) if w])


# ---------------------------------------------------------------------------------------------
# Templates.


def test_builtin_and_plain_templates_mark_responses_and_end_turns_with_eos():
  pieces = chat.BuiltinTemplate().conversation(CONVERSATION)
  assert pieces == [
      chat.Piece('', False, eos=True),
      chat.Piece('<|system|>\nBe brief.\n', False), chat.Piece('<|user|>\nhi\n', False),
      chat.Piece('<|assistant|>\n', False), chat.Piece('hello', True), chat.Piece('', True, True),
      chat.Piece('<|user|>\nbye\n', False),
      chat.Piece('<|assistant|>\n', False), chat.Piece('ciao', True), chat.Piece('', True, True)]
  assert chat.BuiltinTemplate().prompt(CONVERSATION[:2])[-1] == chat.Piece('<|assistant|>\n',
                                                                            False)
  plain = chat.PlainTemplate().conversation([{'role': 'user', 'content': '2+2='},
                                             {'role': 'assistant', 'content': '4'}])
  assert plain == [chat.Piece('', False, True), chat.Piece('2+2=', False), chat.Piece('4', True),
                   chat.Piece('', True, True)]
  ids, mask = chat.encode(tokenizers.ByteTokenizer(), plain)
  assert ids == [256, *b'2+2=', *b'4', 256] and mask == [False] * 5 + [True, True]


def test_hugging_face_chat_template_travels_with_the_tokenizer_and_renders(tmp_path):
  pytest.importorskip('tokenizers')
  hf_dir = tmp_path / 'hf'
  shutil.copytree(HF_GPT2, hf_dir)
  (hf_dir / 'tokenizer_config.json').write_text(json.dumps(
      {'eos_token': '<|endoftext|>', 'chat_template': CHATML}))
  tokenizer = tokenizers.load_hf_tokenizer(str(hf_dir))
  assert tokenizer.chat_template == CHATML
  tokenizer.save(str(tmp_path / 'saved'))  # DIR/tokenizer of a fine-tuning run
  tokenizer = tokenizers.load_tokenizer(str(tmp_path / 'saved'))
  assert tokenizer.chat_template == CHATML
  template = chat.load_template('hf', tokenizer)
  pieces = template.conversation(CONVERSATION)
  assert [(p.text, p.response) for p in pieces] == [
      ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n'
       '<|im_start|>assistant\n', False), ('hello<|im_end|>\n', True),
      ('<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n', False),
      ('ciao<|im_end|>\n', True), ('', False)]
  ids, mask = chat.encode(tokenizer, pieces)
  assert tokenizer.decode(ids) == ''.join(p.text for p in pieces)
  responses = tokenizer.decode([i for i, m in zip(ids, mask) if m])
  assert responses == 'hello<|im_end|>\nciao<|im_end|>\n'
  # A .jinja file works the same way; a template that rewrites earlier turns cannot be split.
  (tmp_path / 'shout.jinja').write_text(
      "{% for m in messages %}{{ m['content'] }}{% endfor %}"
      "{% if add_generation_prompt %}!{% endif %}{{ messages | length }}")
  with pytest.raises(ValueError, match='renders a conversation differently from its start'):
    chat.load_template(str(tmp_path / 'shout.jinja'), tokenizer).conversation(CONVERSATION)


def test_template_errors_name_the_key_and_the_fix(tmp_path):
  with pytest.raises(ValueError, match='data.chat_template=hf: the byte-257 tokenizer ships no '
                     'chat template.*builtin'):
    chat.load_template('hf', tokenizers.ByteTokenizer())
  with pytest.raises(FileNotFoundError, match=r"data.chat_template='missing.jinja': no such"):
    chat.load_template('missing.jinja', tokenizers.ByteTokenizer())


# ---------------------------------------------------------------------------------------------
# Examples and batches.


@pytest.mark.parametrize('packing', [False, True])
def test_the_loss_mask_is_zero_on_prompt_and_padding_tokens(tmp_path, packing):
  records = qa_records(12) + [{'messages': CONVERSATION[1:]}]
  config = sft_config(tmp_path, write_jsonl(tmp_path / 'sft.jsonl', records), packing=packing)
  data = lm_data.prepare(config, None)
  tokenizer = data.tokenizer
  responses = {r['response'] for r in qa_records(12)} | {'hello', 'ciao'}
  # pylint: disable=protected-access
  rows = data._train_rows
  batch = data.train_batch(0, len(rows))  # epoch 0: every training row once
  order = examples._run_rows(data.seed, np.arange(len(rows)), len(rows))  # rows of batch 0
  seen = []
  for row in range(len(rows)):
    targets, weights = batch['targets'][row], batch['weights'][row]
    used = sum(data.train.lengths_S[s] - 1 for s in rows[order[row]])
    segments = batch['segment_ids'][row] if packing else (np.arange(64) < used) * 1
    assert set(np.unique(weights)) <= {0.0, 1.0}
    assert not weights[segments == 0].any()  # padding
    for s in np.unique(segments[segments > 0]):
      mine = segments == s
      # Weighted targets: exactly each response, each ending with EOS; the prompt weighs 0.
      runs = np.split(np.flatnonzero(weights * mine), np.flatnonzero(
          np.diff(np.flatnonzero(weights * mine)) > 1) + 1)
      for run in runs:
        assert targets[run[-1]] == tokenizer.eos_id
        seen.append(tokenizer.decode(targets[run[:-1]]))
      prompt = tokenizer.decode(targets[mine & (weights == 0)])
      assert '<|user|>' in prompt and '<|assistant|>' in prompt
      if packing:  # positions restart with every example
        assert batch['positions'][row][mine][0] == 0
  # Every response of the training split, once and whole, and nothing else.
  turns = np.sum(data.train.response_N & (data.train.tokens_N == tokenizer.eos_id))
  assert set(seen) <= responses and len(seen) == len(set(seen)) == turns


def test_too_long_examples_are_dropped_counted_and_reported(tmp_path, caplog):
  records = qa_records(10) + [{'prompt': 'x' * 40, 'response': 'y'}] * 2
  config = sft_config(tmp_path, write_jsonl(tmp_path / 'sft.jsonl', records))
  with caplog.at_level(logging.WARNING):
    data = lm_data.prepare(config, None)
  assert sum(data.stats['too_long'].values()) == 2
  assert 'longer than data.seq_len + 1 = 65 tokens and were dropped' in caplog.text
  assert data.stats['train_examples'] + data.stats['val_examples'] == 10
  every = np.concatenate([data.train.tokens_N, data.val.tokens_N])
  assert ord('y') not in every  # nothing of them was kept, not even a cut piece
  with pytest.raises(ValueError, match=r'none of the .* fits in data.seq_len \+ 1 = 65 tokens'):
    lm_data.prepare(sft_config(tmp_path, write_jsonl(tmp_path / 'long.jsonl', records[-2:])),
                    None)


def test_batches_are_a_pure_function_of_seed_and_step_and_epochs_cover_every_row(tmp_path):
  config = sft_config(tmp_path, write_jsonl(tmp_path / 'sft.jsonl', qa_records(40)),
                      packing=True)
  a, b = lm_data.prepare(config, None), lm_data.prepare(config, None)
  for step in (0, 3, 50):
    for key, value in a.train_batch(step, 8).items():
      np.testing.assert_array_equal(value, b.train_batch(step, 8)[key])
  assert not np.array_equal(a.train_batch(0, 8)['inputs'], a.train_batch(1, 8)['inputs'])
  # Hosts load their own rows of the same batch.
  halves = [a.train_batch(3, 8, process_index=i, process_count=2)['inputs'] for i in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), a.train_batch(3, 8)['inputs'])
  rows = len(a._train_rows)  # pylint: disable=protected-access
  epoch = np.concatenate([a.train_batch(s, 1)['inputs'] for s in range(rows)])
  assert len({r.tobytes() for r in epoch}) == rows
  # Validation: every example once, the last batch padded at weight 0.
  val = list(a.eval_batches(4))
  assert sum(float(v['weights'].sum()) for v in val) == a.num_eval_tokens() > 0


def test_jsonl_mistakes_name_the_line_and_the_fix(tmp_path):
  def prepare(records, **data):
    lm_data.prepare(sft_config(tmp_path, write_jsonl(tmp_path / 'x.jsonl', records), **data),
                    None)
  good = qa_records(3)
  with pytest.raises(ValueError, match=r'x.jsonl:3 is not valid JSON'):
    prepare(good[:2] + ['{"prompt": "a", '])
  with pytest.raises(ValueError, match=r'x.jsonl:2: an SFT example needs .*"prompt".*"messages"'):
    prepare([good[0], {'question': 'a', 'answer': 'b'}])
  with pytest.raises(ValueError, match=r'x.jsonl:1: the last message must be the assistant'):
    prepare([{'messages': CONVERSATION[:2]}] + good)
  with pytest.raises(ValueError, match=r'x.jsonl:1: "messages"\[0\] must be \{"role": one of'):
    prepare([{'messages': [{'role': 'bot', 'content': 'x'}]}] + good)
  with pytest.raises(ValueError, match=r'x.jsonl:2: a preference example needs .*"rejected" is '
                     'missing'):
    prepare([{'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}, {'prompt': 'p', 'chosen': 'a'}],
            format='preference')
  with pytest.raises(ValueError, match=r'x.jsonl:1: "response" must be a string'):
    prepare([{'prompt': 'p', 'response': 3}] + good)


@pytest.mark.parametrize('overrides, pattern', [
    (dict(data__format='sft'), r"data.corpus: is 'stdlib', but data.format=sft reads a JSONL"),
    (dict(data__format='chat'), r"data.format: 'chat' is not one of text, sft, preference"),
    (dict(data__format='preference', data__corpus='p.jsonl', data__packing=True),
     r'data.packing: is True, but preference pairs are padded'),
    (dict(data__chat_template='chatml'), r"data.chat_template: 'chatml' is neither"),
    (dict(eval__task='task.json'), r"eval.task: is 'task.json', not a .jsonl file"),
    (dict(train__dpo_beta=0.0), r'train.dpo_beta: must be > 0'),
    (dict(eval__task_max_new_tokens=0), r'eval.task_max_new_tokens: must be > 0'),
])
def test_post_training_config_errors(overrides, pattern):
  from tests import test_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=pattern):
    test_config.build(**overrides)


# ---------------------------------------------------------------------------------------------
# Fine-tuning.


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """(directory, workdir) of the tiny byte-level run, the model SFT starts from."""
  directory = str(tmp_path_factory.mktemp('pretrain'))
  return directory, trained_run.train_run(directory)


def test_sft_from_init_from_takes_its_model_and_tokenizer_and_learns(pretrained, tmp_path):
  directory, source = pretrained
  corpus = write_jsonl(tmp_path / 'sft.jsonl', qa_records(64))
  # The config's own model differs: init_from's run decides the architecture.
  config = trained_run.config(
      directory, model=dict(d_model=64, num_layers=1),
      data=dict(format='sft', corpus=corpus, seq_len=64, packing=True, prefetch=1),
      train=dict(init_from=source, steps=30, log_every=10, batch_size=8),
      optim=dict(lr=3e-3, warmup_steps=2), checkpoint=dict(every=30), eval=dict(every=10))
  workdir = str(tmp_path / 'sft')
  result = train.train(config, workdir, progress=False)
  saved = checkpoint.load_config(workdir)
  assert (saved.model.d_model, saved.model.num_layers) == (32, 2)
  assert saved.data.format == 'sft'
  assert os.path.isdir(os.path.join(workdir, 'tokenizer'))
  records = metrics.read(workdir)
  losses = [r['eval/loss'] for r in records if 'eval/loss' in r]
  assert losses[-1] < losses[0] and result['eval/loss'] == losses[-1]
  assert 'eval/bits_per_byte' not in records[-1]  # responses only: no text to measure
  # --mode=eval scores the same validation examples.
  scored = evaluate.evaluate(workdir, config=config, write=False)[0]
  assert scored['loss'] == pytest.approx(losses[-1], rel=1e-5) and scored['bits_per_byte'] is None


def test_sft_trains_only_what_train_trainable_names(pretrained, tmp_path):
  directory, source = pretrained
  corpus = write_jsonl(tmp_path / 'sft.jsonl', qa_records(16))
  config = trained_run.config(
      directory, data=dict(format='sft', corpus=corpus, seq_len=64),
      train=dict(init_from=source, steps=3, log_every=3, batch_size=8,
                 trainable=('final_norm',)),
      checkpoint=dict(every=3), eval=dict(every=3))
  workdir = str(tmp_path / 'sft')
  train.train(config, workdir, progress=False)
  before, _ = checkpoint.restore_params(source)
  after, _ = checkpoint.restore_params(workdir)
  for path, x in jax.tree_util.tree_leaves_with_path(after):
    y = before
    for key in path:
      y = y[key.key]
    assert np.array_equal(x, y) != path[0].key.startswith('final_norm'), path


def test_sft_with_lora_trains_the_adapters(pretrained, tmp_path):
  directory, source = pretrained
  c = trained_run.config_dict(directory, data=dict(
      format='sft', corpus=write_jsonl(tmp_path / 'sft.jsonl', qa_records(16)), seq_len=64),
      train=dict(init_from=source, steps=4, log_every=2, batch_size=8),
      optim=dict(warmup_steps=1), checkpoint=dict(every=4), eval=dict(every=4))
  c.model.lora.rank = 4
  workdir = str(tmp_path / 'lora')
  result = train.train(lm_config.Config.from_config_dict(c), workdir, progress=False)
  assert np.isfinite(result['eval/loss']) and checkpoint.load_config(workdir).model.lora.rank == 4


def test_preference_pairs_share_the_prompt_and_weigh_only_the_final_response(tmp_path):
  records = [{'prompt': CONVERSATION[1:4], 'chosen': f'c{i}', 'rejected': f'rr{i}'}
             for i in range(6)]
  config = trained_run.config(str(tmp_path), data=dict(
      format='preference', corpus=write_jsonl(tmp_path / 'p.jsonl', records), seq_len=64),
      model=dict(max_seq_len=64))
  data = lm_data.prepare(config, None)
  batch = data.train_batch(0, 3)
  assert batch['inputs'].shape == (3, 2, 64)
  tokenizer = data.tokenizer
  for pair in range(3):
    chosen, rejected = (response_text(tokenizer, batch['targets'][pair, k],
                                      batch['weights'][pair, k]) for k in (0, 1))
    assert chosen.startswith('c') and rejected.startswith('rr') and chosen[1:] == rejected[2:]
    prompt = [batch['inputs'][pair, k][:batch['weights'][pair, k].argmax()] for k in (0, 1)]
    np.testing.assert_array_equal(*prompt)  # 'hello' of the earlier turn stays prompt
    assert 'hello' in tokenizer.decode(prompt[0])
