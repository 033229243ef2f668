"""One process of the 2-process test in test_multihost.py (run as a script, 2 CPU devices each).

python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm import train  # pylint: disable=g-import-not-at-top
from tests import train_fakes  # pylint: disable=g-import-not-at-top

# Shared with the single-process reference run in test_multihost.py.
OVERRIDES = dict(parallel__strategy='mesh', parallel__mesh_data=2, parallel__mesh_fsdp=2,
                 train__steps=6, train__log_every=2, checkpoint__every=3,
                 checkpoint__async_save=True, eval__every=3)


def main(process_id: int, num_processes: int, port: int, workdir: str) -> None:
  config = train_fakes.tiny_config(
      parallel__distributed=True, parallel__coordinator_address=f'localhost:{port}',
      parallel__num_processes=num_processes, parallel__process_id=process_id, **OVERRIDES)
  result = train.train(config, workdir, data=train_fakes.FakeData(), progress=False)
  print(f'process {process_id} done: eval/loss={result["eval/loss"]:.6f}', flush=True)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
