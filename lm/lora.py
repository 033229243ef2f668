"""`--mode=merge`: folds a LoRA run's adapters into its base weights, as a run of its own.

`python run.py --config=FILE --workdir=DIR --mode=merge [--step=N|best|all]` writes DIR/merged/:
config.json (the run's, with model.lora.rank=0 and train.init_from naming the LoRA step),
the tokenizer, and checkpoints/<step>/ holding every weight W + (alpha / rank) A B, with the
step's validation loss (so `best` means the same). eval, sample, inspect, Hugging Face export
and train.init_from then read it like any full run, with no base to find. Merged steps carry no
optimizer state: to train on, start a new run with train.init_from=DIR/merged.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import shutil

from lm import checkpoint as ckpt_lib
from lm import config as lm_config
from lm.model import lora as lora_lib

MERGED_DIR = 'merged'
_KEEP_ALL = 2**31 - 1  # merged steps are never deleted by retention


def merge(workdir: str, step: int | str = 'latest') -> tuple[str, list[int]]:
  """Writes the merged steps (N, 'latest', 'best' or 'all') into DIR/merged.

  Returns that workdir and the steps written (a step merged before is skipped).
  """
  from lm import data as lm_data  # pylint: disable=g-import-not-at-top (heavy)

  workdir = os.path.abspath(workdir)
  config = ckpt_lib.load_config(workdir)
  if not config.model.lora.rank:
    raise ValueError(f'{workdir} is not a LoRA run (model.lora.rank=0 in its config.json): its '
                     'checkpoints are whole models already, with nothing to merge.')
  steps = (ckpt_lib.available_steps(workdir) if step == 'all' else [])
  steps = steps or [ckpt_lib.resolve_step(workdir, 'latest' if step == 'all' else step)]
  target = os.path.join(workdir, MERGED_DIR)
  os.makedirs(target, exist_ok=True)
  tokenizer = os.path.join(workdir, lm_data.pipeline.TOKENIZER_DIR)
  if os.path.isdir(tokenizer):
    shutil.copytree(tokenizer, os.path.join(target, lm_data.pipeline.TOKENIZER_DIR),
                    dirs_exist_ok=True)
  model = lora_lib.without_lora(config.model)
  losses = ckpt_lib.eval_losses(workdir)
  checkpointer = ckpt_lib.Checkpointer(target, dataclasses.replace(
      config.checkpoint, keep=_KEEP_ALL, keep_best=0, async_save=False))
  merged = lambda number: dataclasses.replace(config, model=model, train=dataclasses.replace(
      config.train, init_from=f'{workdir}:{number}'))  # where the weights came from
  written = []
  try:
    for number in steps:
      params, _ = ckpt_lib.restore_params(workdir, number, model)  # LoRA off: folded in
      meta = {'data_step': number, 'config': merged(number).to_dict()}
      if checkpointer.save(number, params, None, meta, losses.get(number)):
        written.append(number)
  finally:
    checkpointer.close()
  ckpt_lib.save_config(target, merged(steps[-1]))
  return target, written


def main(config: lm_config.Config, workdir: str, step: str | None = None) -> None:
  """CLI entry: python run.py --mode=merge --config=... --workdir=DIR [--step=N|best|all].

  The run's own config.json decides everything; the config given is not used.
  """
  del config
  std_logging.getLogger('absl').setLevel(std_logging.WARNING)  # orbax logs every restore
  try:
    target, written = merge(workdir, step or 'latest')
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(str(e)) from None
  if written:
    print(f'Merged the adapters of step(s) {", ".join(map(str, written))} into {target}.')
  else:
    print(f'{target} already holds the merged step(s).')
  print(f'Use it like any run: python run.py --config=FILE --workdir={target} --mode=eval')
