"""Scores the stage-1 model of the context-extension study with every RoPE scaling, untuned.

  python -m experiments.context_extension.before workdirs/ctx/base

Prints a markdown table of validation loss (nats/byte) per scaling and evaluation context, and
writes it to DIR/before.md; nothing in DIR/eval is overwritten.
"""

import dataclasses
import os
import sys

from experiments.context_extension import config as study
from lm import config as lm_config
from lm import data as lm_data
from lm import evaluate


def table(base_dir: str) -> str:
  config = lm_config.Config.from_config_dict(study.get_config())
  data = lm_data.prepare(config, base_dir)
  lens = config.eval.seq_lens
  rows = ['| rope_scaling | ' + ' | '.join(f'loss @{n}' for n in lens) + ' |',
          '|---|' + '---:|' * len(lens)]
  for scaling in study.SCALINGS:
    variant = dataclasses.replace(
        config, model=dataclasses.replace(config.model, rope_scaling=scaling))
    (result,) = evaluate.evaluate(base_dir, 'latest', config=variant, data=data, write=False)
    losses = [result['seq_lens'][str(n)]['loss'] for n in lens]
    rows.append(f'| {scaling} | ' + ' | '.join(f'{x:.4f}' for x in losses) + ' |')
  return '\n'.join(rows)


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    sys.exit(f'usage: python -m experiments.context_extension.before BASE_WORKDIR')
  text = table(argv[1])
  with open(os.path.join(argv[1], 'before.md'), 'w') as f:
    f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  main(sys.argv)
