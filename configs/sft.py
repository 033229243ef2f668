"""Supervised fine-tuning (SFT) of a trained run: the documented starting point.

```bash
python run.py --config=configs/sft.py --workdir=workdirs/sft \
  --config.train.init_from=workdirs/default --config.data.corpus=sft.jsonl
```

data.corpus is a JSONL file of {"prompt", "response"} or {"messages": [{"role", "content"}]}
examples (val.jsonl beside a train.jsonl is the validation split); the loss counts response
tokens only. The model and tokenizer come from train.init_from (DIR[:step] of an lm run, by
default the one `make run` trains, or hf:PATH), so this config's model section only says how
to train it. Variants, one flag each:

  LoRA                    --config.model.lora.rank=8
  the last layer only     --config.train.trainable="('layer_3/', 'final_norm')"
  another chat template   --config.data.chat_template=hf (the tokenizer's), none, or X.jinja
"""

from configs import default


def get_config(arg=None):
  del arg
  config = default.get_config()
  d = config.data
  d.format = 'sft'
  d.corpus = 'sft.jsonl'  # the examples; --config.data.corpus=PATH
  d.chat_template = 'builtin'
  d.packing = True  # whole examples packed per row, attention kept inside each
  t = config.train
  t.init_from = 'workdirs/default'
  t.steps, t.batch_size, t.log_every = 300, 16, 10
  o = config.optim
  o.lr, o.warmup_steps, o.weight_decay = 3e-4, 20, 0.0
  config.checkpoint.every = 100
  config.eval.every = 100
  config.eval.max_batches = 0
  return config
