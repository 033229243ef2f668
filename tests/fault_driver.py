"""run.py with one fault injected at an exact point, for tests/test_faults.py.

  LM_FAULT=KIND:STEP python -m tests.fault_driver RUN_PY_FLAGS...

KIND is one of

  kill_at_batch     SIGKILL as the loop takes the batch of STEP (the step before it in flight)
  kill_in_commit    SIGKILL once checkpoint STEP is written but before orbax renames it into place
                    (the tmp folder is on disk: an asynchronous write cut short)
  kill_in_eval      SIGKILL halfway through the evaluation at STEP (after its first batch)
  sigterm_at_batch  SIGTERM (a preemption notice) as the loop takes the batch of STEP

and with LM_BATCH_LOG=FILE, every training batch the loop takes is appended to FILE as
'STEP SHA256' (the batches a run saw, comparable across processes). The points are reached
through the code path itself, never by timing, so a test that uses them cannot race.
"""

import functools
import hashlib
import os
import runpy
import signal
import sys

from orbax.checkpoint._src.path import atomicity

from lm.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIND, _, STEP = os.environ.get('LM_FAULT', '').partition(':')
STEP = int(STEP) if STEP else -1
BATCH_LOG = os.environ.get('LM_BATCH_LOG')
_taken = {'last': -1}  # the step of the last training batch the loop took


def _fault(kind: str, step: int) -> bool:
  return KIND == kind and STEP == step


def _kill() -> None:
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _digest(batch) -> str:
  digest = hashlib.sha256()
  for key in sorted(batch):
    digest.update(key.encode())
    digest.update(batch[key].tobytes())
  return digest.hexdigest()


def _train_iterator(original):

  @functools.wraps(original)
  def wrapper(self, start_step, *args, **kwargs):
    inner = original(self, start_step, *args, **kwargs)
    log = open(BATCH_LOG, 'a', buffering=1) if BATCH_LOG else None  # line-buffered: kill-safe
    try:
      for step, batch in enumerate(inner, start_step):
        if _fault('kill_at_batch', step):
          _kill()
        if _fault('sigterm_at_batch', step):
          os.kill(os.getpid(), signal.SIGTERM)
        if log:
          log.write(f'{step} {_digest(batch)}\n')
        _taken['last'] = step
        yield batch
    finally:
      if log:
        log.close()
      if hasattr(inner, 'close'):
        inner.close()

  return wrapper


def _eval_batches(original):

  @functools.wraps(original)
  def wrapper(self, *args, **kwargs):
    for i, batch in enumerate(original(self, *args, **kwargs)):
      if i == 1 and _fault('kill_in_eval', _taken['last'] + 1):
        _kill()
      yield batch

  return wrapper


def _finalize(original):

  @functools.wraps(original)
  async def wrapper(self, *args, **kwargs):
    if KIND == 'kill_in_commit' and self.get_final().name == str(STEP):  # the step, not an item
      assert self.get().exists(), f'{self.get()} should hold the written checkpoint'
      _kill()
    return await original(self, *args, **kwargs)

  return wrapper


def main() -> None:
  if KIND not in ('', 'kill_at_batch', 'kill_in_commit', 'kill_in_eval', 'sigterm_at_batch'):
    sys.exit(f'LM_FAULT={KIND}:{STEP}: unknown fault (see tests/fault_driver.py).')
  pipeline.Data.train_iterator = _train_iterator(pipeline.Data.train_iterator)
  pipeline.Data.eval_batches = _eval_batches(pipeline.Data.eval_batches)
  rename = atomicity.AtomicRenameTemporaryPath
  rename.finalize = _finalize(rename.finalize)
  sys.argv = ['run.py'] + sys.argv[1:]
  sys.path.insert(0, REPO)
  runpy.run_path(os.path.join(REPO, 'run.py'), run_name='__main__')


if __name__ == '__main__':
  main()
