"""Direct Preference Optimization (DPO) of an SFT run: the documented starting point.

```bash
python run.py --config=configs/dpo.py --workdir=workdirs/dpo \
  --config.train.init_from=workdirs/sft --config.data.corpus=pairs.jsonl
```

data.corpus is a JSONL file of {"prompt", "chosen", "rejected"} pairs; train.batch_size counts
pairs. The reference model is the starting one (train.init_from): a frozen copy of it, or with
LoRA (--config.model.lora.rank=8) the same weights with the adapters off, so no copy. Logged:
train/loss, train/reward_accuracy, train/reward_margin, train/chosen_reward,
train/rejected_reward, and the same under eval/ on the validation pairs.
"""

from configs import sft


def get_config(arg=None):
  del arg
  config = sft.get_config()
  d = config.data
  d.format = 'preference'
  d.corpus = 'pairs.jsonl'  # the pairs; --config.data.corpus=PATH
  d.packing = False  # pairs are padded, one sequence per row
  t = config.train
  t.init_from = 'workdirs/sft'
  t.dpo_beta = 0.1
  t.steps, t.batch_size = 200, 16
  o = config.optim
  o.lr, o.warmup_steps, o.schedule = 5e-5, 10, 'constant'
  return config
