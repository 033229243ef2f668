"""`lm` entry point: python run.py --config=FILE[:ARGS] --workdir=DIR --mode=MODE [--config.x.y=v].

Parses flags, validates the config, and hands it to lm.<mode>.main(config, workdir, ...).
"""

import importlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from lm import config as lm_config

# mode -> (module, the command-line flags that mode takes besides config and workdir)
MODES = {
    'train': ('lm.train', ()),
    'eval': ('lm.evaluate', ('step', 'hf')),
    'sample': ('lm.sample', ('step', 'prompt', 'hf')),
    'info': ('lm.info', ()),
    'sweep': ('lm.sweep', ('sweep_dry_run', 'sweep_workers')),
    'report': ('lm.sweep', ()),
    'inspect': ('lm.inspect', ('step', 'prompt', 'hf', 'tokens')),
    'merge': ('lm.lora', ('step',)),
}

config_flags.DEFINE_config_file('config', None, 'Config file, optionally FILE:ARGS.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, tokenizer, results.')
flags.DEFINE_enum('mode', 'train', list(MODES), 'What to do.')
flags.DEFINE_string('step', None, 'Checkpoint to restore: a step N, "best", or "all".')
flags.DEFINE_multi_string('prompt', None, 'Prompt for sample and inspect (repeatable).')
flags.DEFINE_string('tokens', None, 'Inspect: comma-separated tokens whose embedding '
                    'neighbours to show.')
flags.DEFINE_string('hf', None, 'Use an imported Hugging Face checkpoint directory instead.')
flags.DEFINE_bool('sweep_dry_run', False, 'List the runs of a sweep without training.')
flags.DEFINE_integer('sweep_workers', 1, 'Sweep runs trained in parallel processes.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  module_name, mode_flags = MODES[flags.FLAGS.mode]
  if flags.FLAGS.mode != 'info' and not flags.FLAGS.workdir:
    raise app.UsageError(f'--mode={flags.FLAGS.mode} needs --workdir=DIR.')
  try:
    config = lm_config.Config.from_config_dict(flags.FLAGS.config)
  except ValueError as e:
    sys.exit(f'Invalid config: {e}')
  from lm import parallel  # pylint: disable=g-import-not-at-top (jax: only once flags parse)
  parallel.use_xla_flags(config.parallel.xla_flags)  # before JAX starts, which reads them
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    sys.exit(f'--mode={flags.FLAGS.mode} is not available in this version of lm.')
  options = {name: getattr(flags.FLAGS, name) for name in mode_flags}
  if flags.FLAGS.mode in ('sweep', 'report'):
    options.update(config_dict=flags.FLAGS.config, config_file=flags.FLAGS['config'].config_filename,
                   report_only=flags.FLAGS.mode == 'report')
  module.main(config, flags.FLAGS.workdir, **options)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with config errors (a mistyped key or a bad file argument) made readable."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'{e}\nPass --helpshort to see the flags.')
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    message = str(e).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
    sys.exit(f'Invalid config: {message}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
