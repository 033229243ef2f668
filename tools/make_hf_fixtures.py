"""Builds tests/fixtures/hf/: tiny random Hugging Face models with transformers' logits.

Developer-only, not part of lm's install: it needs torch, transformers, tokenizers and
sentencepiece besides lm's own dependencies. Outside the repository, e.g.

  python3.11 -m venv ~/hf-tools
  ~/hf-tools/bin/pip install torch==2.13.0 transformers -r requirements.lock tokenizers
  ~/hf-tools/bin/python tools/make_hf_fixtures.py

For every case, <out>/<case>/ gets what transformers' save_pretrained writes (config.json,
model.safetensors; shards and model.safetensors.index.json for one case), a tokenizer for two
cases, and reference.npz: input_ids and position_ids [B, T] and the float32 logits [B, T, V]
transformers computes for them. Weights are random with a large spread (norm scales and biases
included) so that a wrongly mapped tensor shows in the logits.

Then, unless --no_check, it checks lm against the references (max |difference| <= 1e-4): the
logits of lm.hf.load_pretrained, and those of transformers loading what lm.hf.save_pretrained
wrote (the export round trip, which the test suite cannot run without torch).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
BATCH, LENGTH = 2, 12

# case -> (config class, config kwargs, save kwargs, tokenizer kind, first position)
CASES = {
    'gpt2': (transformers.GPT2Config, dict(
        vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=0), {}, 'bpe', 0),
    'llama_gqa': (transformers.LlamaConfig, dict(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=500.0), {}, 'sentencepiece', 0),
    'llama_mqa_tied': (transformers.LlamaConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True, max_position_embeddings=64), {}, None, 0),
    # head_dim 16 != hidden / heads; a short original context so that llama3 scaling changes
    # most frequencies, and positions from 200 on so that they matter.
    'llama3_rope': (transformers.LlamaConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32)),
                    {}, None, 200),
    'mistral_sliding': (transformers.MistralConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
        max_position_embeddings=64, rope_theta=1e6), dict(max_shard_size='40KB'), None, 0),
    'mixtral': (transformers.MixtralConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64), {}, None, 0),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Every weight random: norm scales around 1, biases and routers spread out too."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if 'norm' in name or '.ln_' in name:
        param.copy_((1.0 + 0.2 * noise) if name.endswith('weight') else 0.2 * noise)
      elif 'gate.weight' in name:  # the MoE router: clear top-2 choices
        param.copy_(0.5 * noise)
      else:
        param.copy_(0.15 * noise)


def training_text() -> str:
  """Deterministic English text for the tiny tokenizers: the Zen of Python."""
  with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints it
    import this  # pylint: disable=g-import-not-at-top
  return ''.join(this.d.get(c, c) for c in this.s)


def save_tokenizer(kind: str, directory: str, vocab_size: int) -> None:
  if kind == 'bpe':  # GPT-2 style byte-level BPE, EOS <|endoftext|> = 0 (from config.json)
    # pylint: disable-next=g-import-not-at-top
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(training_text().splitlines(), trainer)
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()
    tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  elif kind == 'sentencepiece':  # Llama 2 style: <unk> 0, <s> 1, </s> 2, byte fallback
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text().splitlines()), model_writer=model,
        vocab_size=vocab_size, model_type='bpe', byte_fallback=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    with open(os.path.join(directory, 'tokenizer.model'), 'wb') as f:
      f.write(model.getvalue())
    with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
      json.dump({'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>'}, f, indent=2)


def hf_logits(model: torch.nn.Module, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(positions))
  return out.logits.float().numpy()


def build(out: str) -> None:
  for index, (case, (config_cls, kwargs, save_kwargs, tokenizer, start)) in enumerate(
      CASES.items()):
    directory = os.path.join(out, case)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    torch.manual_seed(index)
    config = config_cls(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager')
    randomize(model, seed=index)
    model.eval()
    model.save_pretrained(directory, **save_kwargs)
    if tokenizer:
      save_tokenizer(tokenizer, directory, config.vocab_size)
    rng = np.random.default_rng(index)
    ids = rng.integers(0, config.vocab_size, (BATCH, LENGTH)).astype(np.int64)
    positions = np.broadcast_to(np.arange(start, start + LENGTH), ids.shape).astype(np.int64)
    np.savez(os.path.join(directory, 'reference.npz'), input_ids=ids, position_ids=positions,
             logits=hf_logits(model, ids, positions))
    print(f'{case}: {sorted(os.listdir(directory))}')


def check(out: str) -> bool:
  """lm's logits against the references, and transformers' on what lm exports."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, ROOT)
  from lm import hf  # pylint: disable=g-import-not-at-top

  ok = True
  for case in CASES:
    directory = os.path.join(out, case)
    reference = np.load(os.path.join(directory, 'reference.npz'))
    model, params, model_config = hf.load_pretrained(directory)
    logits = np.asarray(model.apply({'params': params}, reference['input_ids'],
                                    reference['position_ids']))
    imported = float(np.max(np.abs(logits - reference['logits'])))
    with tempfile.TemporaryDirectory() as exported:
      hf.save_pretrained(model_config, params, exported)
      reloaded = transformers.AutoModelForCausalLM.from_pretrained(
          exported, attn_implementation='eager').eval()
      round_trip = float(np.max(np.abs(
          hf_logits(reloaded, reference['input_ids'], reference['position_ids'])
          - reference['logits'])))
    good = imported <= TOLERANCE and round_trip <= TOLERANCE
    ok &= good
    print(f'{case:16s} lm vs transformers {imported:.2e}   transformers on lm\'s export '
          f'{round_trip:.2e}   {"ok" if good else "FAIL"}')
  return ok


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.join(ROOT, 'tests', 'fixtures', 'hf'))
  parser.add_argument('--no_check', action='store_true', help='only build the fixtures')
  args = parser.parse_args()
  build(args.out)
  if not args.no_check and not check(args.out):
    sys.exit(f'Parity check failed (tolerance {TOLERANCE}).')


if __name__ == '__main__':
  main()
