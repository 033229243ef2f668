"""The same character-level Shakespeare model in PyTorch eager, timed on this machine.

  pip install torch  # CPU wheel; not a dependency of lm
  python benchmarks/torch_reference.py [--steps=200] [--threads=N] [--compile] [--bf16]

The issue's speed goal is relative to nanoGPT's CPU recipe, quoted as about 30 ms per
iteration. This measures what a PyTorch GPT of that shape (4 layers, 4 heads, 128 wide,
64-token context, batch 12, no biases, tied embedding, AdamW) actually takes here, so the
comparison in BENCHMARKS.md is against a number taken on the same machine, not a quote.
Written for this benchmark; it trains on random tokens (speed does not depend on the data).
--bf16 runs the forward pass under CPU autocast to bfloat16 (PyTorch's nearest counterpart of
lm's model.matmul_precision=bfloat16: its linear layers then take and give bfloat16).
"""

import argparse
import math
import time

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
  """Pre-LayerNorm attention + GELU MLP, as GPT-2."""

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
    self.qkv = nn.Linear(width, 3 * width, bias=False)
    self.out = nn.Linear(width, width, bias=False)
    self.fc_in = nn.Linear(width, 4 * width, bias=False)
    self.fc_out = nn.Linear(4 * width, width, bias=False)

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = self.qkv(self.norm1(x)).split(d, dim=2)
    q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
    return x + self.fc_out(F.gelu(self.fc_in(self.norm2(x)), approximate='tanh'))


class GPT(nn.Module):

  def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int):
    super().__init__()
    self.embed = nn.Embedding(vocab, width)
    self.pos = nn.Embedding(context, width)
    self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
    self.norm = nn.LayerNorm(width, bias=False)

  def forward(self, tokens):
    x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.norm(x) @ self.embed.weight.T  # tied head


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--warmup', type=int, default=20)
  parser.add_argument('--threads', type=int, default=0, help='0: torch default')
  parser.add_argument('--compile', action='store_true', help='torch.compile the model')
  parser.add_argument('--bf16', action='store_true', help='forward under bfloat16 autocast')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  vocab, context, batch = 65, 64, 12
  model = GPT(vocab, context, width=128, layers=4, heads=4)
  step_model = torch.compile(model) if args.compile else model
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
  tokens = torch.randint(vocab, (batch, context + 1))

  def step():
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.bf16):
      logits = step_model(tokens[:, :-1])
      loss = F.cross_entropy(logits.reshape(-1, vocab).float(), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()

  for _ in range(args.warmup):
    step()
  start = time.perf_counter()
  for _ in range(args.steps):
    step()
  ms = (time.perf_counter() - start) / args.steps * 1e3
  params = sum(p.numel() for p in model.parameters())
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, compile={args.compile}, '
        f'bf16={args.bf16}: '
        f'{ms:.1f} ms/step, {batch * context / ms * 1e3:,.0f} tokens/s, {params / 1e6:.2f}M params')


if __name__ == '__main__':
  main()
