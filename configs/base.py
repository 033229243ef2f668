"""Every default of `lm`, each key commented. Other configs start here and change what differs."""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, dropout, batch order and sampling

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0: the tokenizer's vocabulary, rounded up to vocab_multiple_of
  m.vocab_multiple_of = 64  # padding of vocab_size=0 for faster matmuls
  m.d_model = 256  # residual stream width
  m.num_layers = 4  # transformer blocks
  m.num_heads = 4  # query heads
  m.num_kv_heads = 4  # key/value heads: MHA = num_heads, MQA = 1, GQA = a divisor of num_heads
  m.head_dim = 0  # 0: d_model // num_heads
  m.d_ff = 0  # FFN hidden width; 0: 4 * d_model (mlp) or 8/3 * d_model rounded up (swiglu, moe)
  m.ffn_multiple_of = 64  # rounding of the derived swiglu/moe hidden width
  m.max_seq_len = 1024  # longest sequence the positions support (learned table size)
  m.pos_emb = 'learned'  # sinusoidal | learned | rope | alibi | relative | none
  m.rope_theta = 10000.0  # RoPE base frequency
  m.rope_fraction = 1.0  # fraction of each head's dimensions that RoPE rotates (partial rotary)
  m.rope_scaling = 'none'  # none | linear (position interpolation) | ntk (base rescaled) | llama3
  m.rope_scaling_factor = 1.0  # context extension factor for rope_scaling
  m.rope_original_max_seq_len = 8192  # llama3 scaling: the context the model was trained on
  m.rope_low_freq_factor = 1.0  # llama3 scaling: wavelengths above original/low are scaled
  m.rope_high_freq_factor = 4.0  # llama3 scaling: wavelengths below original/high are kept
  m.relative_num_buckets = 32  # relative: number of learned distance buckets per head
  m.relative_max_distance = 128  # relative: distance at which the log-spaced buckets end
  m.attention_window = 0  # sliding-window attention span in tokens; 0: full causal attention
  m.attention_pattern = 'full'  # full | local (the sliding window) | fixed (Sparse Transformer)
  m.attention_stride = 0  # fixed: block length; a query sees its block and earlier summaries
  m.attention_summary = 1  # fixed: positions at the end of each block that later blocks see
  m.qk_norm = False  # RMS-normalise queries and keys per head before the dot product
  m.attn_logit_softcap = 0.0  # cap * tanh(logits / cap) on attention logits; 0: off
  m.final_logit_softcap = 0.0  # the same on the LM head's logits; 0: off
  m.attention_impl = 'xla'  # xla (einsum) | dot_product_attention (jax.nn) | cudnn | blockwise
  m.attention_block = 128  # blockwise: keys per block of the online softmax (memory ~ T x block)
  m.ffn = 'mlp'  # mlp (GELU) | swiglu | moe
  m.num_experts = 8  # moe: experts per layer
  m.top_k = 2  # moe: experts each token is routed to
  m.expert_ffn = 'swiglu'  # moe: each expert's FFN, mlp | swiglu
  m.capacity_factor = 1.25  # moe: expert capacity = factor * tokens * top_k / experts; 0: dropless
  m.router_aux_loss_weight = 0.01  # moe: Switch-style load-balancing loss weight
  m.router_z_loss_weight = 0.001  # moe: router z-loss weight
  m.norm = 'layernorm'  # layernorm | rmsnorm
  m.norm_eps = 1e-5  # norm epsilon
  m.norm_position = 'pre'  # pre (norm before each sublayer) | post (after the residual add)
  m.use_bias = True  # biases in linear layers and LayerNorm
  m.tie_embeddings = True  # LM head shares the token embedding matrix
  m.embed_dropout = 0.0  # dropout on the embeddings
  m.attn_dropout = 0.0  # dropout on attention probabilities
  m.resid_dropout = 0.0  # dropout on each sublayer's output before the residual add
  m.init_std = 0.02  # std of normal initialisers; residual projections get / sqrt(2 * num_layers)
  m.dtype = 'float32'  # compute dtype: float32 | bfloat16 | float16 (logits and losses stay float32)
  m.param_dtype = 'float32'  # parameter storage dtype
  m.matmul_precision = 'float32'  # projections' operands: float32 | bfloat16 (float32 sums)
  m.scan_layers = True  # stack the blocks under nn.scan: compile time flat in depth
  m.remat = 'none'  # rematerialisation of each block: none | full | dots | dots_no_batch
  lora = m.lora = ml_collections.ConfigDict()  # LoRA: train low-rank adapters on a frozen base
  lora.rank = 0  # adapter rank; 0: off (needs train.init_from: the base the adapters adapt)
  lora.alpha = 16.0  # the update is scaled by alpha / rank
  lora.dropout = 0.0  # dropout on the adapters' input
  lora.targets = ('q', 'k', 'v', 'o')  # projections adapted: q, k, v, o (attention), ffn (all FFN)

  d = c.data = ml_collections.ConfigDict()
  d.corpus = 'stdlib'  # stdlib | a text file | a directory | a glob | a pre-tokenized .bin
  d.val_fraction = 0.05  # share of the corpus's files (or text) held out for validation
  d.tokenizer = 'sentencepiece'  # sentencepiece | byte | char
  d.tokenizer_path = ''  # an existing sentencepiece .model; '': train one on the training split
  d.vocab_size = 4096  # sentencepiece: vocabulary size to train
  d.sp_model_type = 'bpe'  # sentencepiece: bpe | unigram
  d.sp_train_chars = 20_000_000  # sentencepiece: at most this many characters to train on
  d.seq_len = 256  # tokens per training example
  d.packing = False  # False: random windows; True: whole documents packed with segment ids
  d.eval_stride = 0  # evaluation windows advance by this many tokens; 0: seq_len (no overlap)
  d.cache_dir = ''  # tokenized-corpus cache; '': ~/.cache/lm
  d.prefetch = 2  # batches prepared ahead in a background thread
  d.format = 'text'  # text (documents) | sft (JSONL examples) | preference (JSONL pairs for DPO)
  d.chat_template = 'builtin'  # sft/preference/eval.task: builtin | hf | none | a .jinja file

  t = c.train = ml_collections.ConfigDict()
  t.steps = 1000  # optimizer steps (unless a budget below is set)
  t.tokens = 0  # training-token budget: steps = ceil(tokens / (batch_size x seq_len)); 0: off
  t.flops = 0.0  # training-compute budget in FLOPs (info's flops_per_token x tokens); 0: off
  t.batch_size = 32  # global batch size in sequences, split over all devices
  t.grad_accum = 1  # micro-batches accumulated per optimizer step
  t.steps_per_call = 1  # optimizer steps per compiled call (lax.scan)
  t.log_every = 50  # steps between metrics.jsonl lines
  t.max_nan_steps = 10  # consecutive non-finite losses (updates skipped) before the run stops
  t.init_from = ''  # DIR[:step] of another run, or hf:PATH; '': random init
  t.trainable = ()  # regexes over parameter paths that train; empty: everything
  t.peak_flops = 0.0  # device peak FLOP/s for MFU; 0: from a table, or a measured matmul on CPU
  t.dpo_beta = 0.1  # data.format=preference: DPO's beta (higher: stay closer to the reference)

  o = c.optim = ml_collections.ConfigDict()
  o.name = 'adamw'  # adamw | adafactor | lion | muon
  o.lr = 1e-3  # peak learning rate
  o.schedule = 'cosine'  # cosine | linear | constant | wsd (warmup-stable-decay)
  o.warmup_steps = 100  # linear warmup from 0
  o.min_lr_ratio = 0.1  # final learning rate as a fraction of lr
  o.decay_fraction = 0.2  # wsd: share of the steps spent decaying
  o.b1 = 0.9  # first-moment decay
  o.b2 = 0.95  # second-moment decay
  o.eps = 1e-8  # denominator epsilon (> 0 for adamw and muon)
  o.weight_decay = 0.1  # decoupled weight decay
  o.decay_embeddings = False  # also decay embeddings (norms and biases never decay)
  o.grad_clip = 1.0  # global-norm clipping; 0: off

  k = c.checkpoint = ml_collections.ConfigDict()
  k.every = 500  # steps between checkpoints
  k.keep = 2  # newest checkpoints kept
  k.keep_best = 1  # checkpoints with the lowest validation loss kept besides
  k.async_save = True  # write checkpoints in the background

  e = c.eval = ml_collections.ConfigDict()
  e.every = 250  # steps between validation passes during training; 0: only at the end
  e.batch_size = 32  # global evaluation batch size
  e.max_batches = 0  # batches per validation pass during training; 0: the whole split
  e.seq_lens = ()  # extra context lengths for the context-length evaluation
  e.task = ''  # --mode=eval: a JSONL of {"prompt","answer"} scored by greedy exact match; '': off
  e.task_max_new_tokens = 64  # eval.task: tokens generated per prompt (greedy, KV cache)

  s = c.sample = ml_collections.ConfigDict()
  s.max_new_tokens = 200  # tokens generated per prompt
  s.temperature = 0.8  # 0: greedy
  s.top_k = 0  # sample among the k most likely tokens; 0: off
  s.top_p = 1.0  # nucleus sampling mass; 1: off
  s.stop = ''  # stop once this string appears; '': at EOS or max_new_tokens

  p = c.parallel = ml_collections.ConfigDict()
  p.strategy = 'pmap'  # pmap (replicated data parallelism) | mesh (jit over a sharded mesh)
  p.mesh_data = -1  # mesh: data-parallel axis size; -1: the devices left over
  p.mesh_fsdp = 1  # mesh: parameter-sharding axis size (ZeRO-3 / FSDP); -1: the rest
  p.mesh_expert = 1  # mesh: expert-parallel axis size (MoE experts, and the batch); -1: the rest
  p.mesh_context = 1  # mesh: context-parallel axis size (sequence split, ring attention); -1: rest
  p.mesh_tensor = 1  # mesh: tensor-parallel axis size (heads, FFN width, vocab); -1: the rest
  # mesh: logical axis -> mesh axes ('a,b' for several, '' replicated); the model names its axes.
  # Where two axes of one weight ask for the same mesh axis, the one listed first here gets it.
  r = p.rules = ml_collections.ConfigDict()
  r.batch = 'data,fsdp,expert'  # the batch of every input and activation
  r.length = 'context'  # the sequence of every input and activation (context parallelism)
  r.expert = 'expert'  # MoE experts (the stacked [E, ...] expert weights)
  r.vocab = 'tensor'  # token embedding rows and LM head columns
  r.embed = 'fsdp'  # d_model: FSDP shards every weight along it
  r.heads = 'tensor'  # query heads (and attention output rows)
  r.kv_heads = 'tensor'  # key/value heads; '' for MQA or when num_kv_heads < mesh_tensor
  r.head_dim = ''  # per-head width
  r.mlp = 'tensor'  # FFN hidden width
  r.layers = ''  # the stacked layer axis of scan_layers=True
  r.relative_buckets = ''  # T5 relative-position buckets (pos_emb=relative)
  p.distributed = False  # multi-host: jax.distributed.initialize (unset keys below: JAX detects)
  p.coordinator_address = ''  # distributed: process 0's host:port; '': from JAX or SLURM env
  p.num_processes = 0  # distributed: processes in the job; 0: from SLURM, Open MPI, Cloud TPU, ...
  p.process_id = -1  # distributed: this process's index (0 is the coordinator); -1: detected
  # XLA flags this run wants, added to $XLA_FLAGS by run.py before JAX starts (space-separated).
  p.xla_flags = ''
  return c
