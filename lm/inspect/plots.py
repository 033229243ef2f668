"""The pictures of an inspect report: matplotlib figures written as PNG.

Figures are built with matplotlib's object API (`Figure`, no pyplot), so nothing global is
touched and no display is needed. Token strings label the axes, with whitespace made visible
(lm.inspect.report.show). Heatmaps of long prompts keep the last MAX_COLUMNS positions (the
numbers in data.json keep them all).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import matplotlib
from matplotlib import figure as mpl_figure
import numpy as np

MAX_COLUMNS = 48  # positions drawn in a lens or routing heatmap
MAX_TICKS = 40  # token labels per attention axis (every n-th beyond)
DPI = 110


def _save(fig: mpl_figure.Figure, path: str) -> None:
  fig.savefig(path, dpi=DPI, bbox_inches='tight')


def _tail(count: int) -> slice:
  return slice(max(0, count - MAX_COLUMNS), count)


def next_token(path: str, labels: Sequence[str], probs: Sequence[float], context: str) -> None:
  """Horizontal bars: the top-k next tokens after the prompt, most likely on top."""
  fig = mpl_figure.Figure(figsize=(6.5, 0.9 + 0.32 * len(labels)))
  ax = fig.subplots()
  y = np.arange(len(labels))[::-1]
  bars = ax.barh(y, probs, color='tab:blue')
  ax.bar_label(bars, [f'{p:.1%}' for p in probs], padding=3, fontsize=8)
  ax.set_yticks(y, labels, fontsize=9)
  ax.set_xlim(0, min(1.0, max(probs) * 1.25 + 0.02))
  ax.set_xlabel('probability')
  ax.set_title(f'Next token after …{context}', fontsize=10)
  _save(fig, path)


def _cell_grid(values_RxT: np.ndarray, text_RxT: Sequence[Sequence[str]],
               style: Callable[[int, int], dict[str, Any]], inputs: Sequence[str],
               row_names: Sequence[str], **image: Any):
  """A row x position heatmap with a short text in every cell, positions labelled with the
  input tokens (the last MAX_COLUMNS of them). Returns (figure, axes, image, note)."""
  cols = _tail(values_RxT.shape[1])
  note = f' (last {MAX_COLUMNS} of {values_RxT.shape[1]} positions)' if cols.start else ''
  rows, length = values_RxT.shape[0], len(inputs[cols])
  fig = mpl_figure.Figure(figsize=(max(5.0, 1.2 + 0.62 * length), max(2.4, 1.2 + 0.36 * rows)))
  ax = fig.subplots()
  shown = ax.imshow(values_RxT[:, cols], aspect='auto', interpolation='nearest', **image)
  font = 8 if length <= 16 else 6.5 if length <= 32 else 5
  for r in range(rows):
    for c in range(cols.start, cols.stop):
      ax.text(c - cols.start, r, text_RxT[r][c], ha='center', va='center', fontsize=font,
              clip_on=True, **style(r, c))
  ax.set_xticks(range(length), inputs[cols], rotation=90, fontsize=font + 1)
  ax.set_yticks(range(rows), row_names, fontsize=8)
  return fig, ax, shown, note


def logit_lens(path: str, probs_LxT: np.ndarray, top_LxT: Sequence[Sequence[str]],
               stream_names: Sequence[str], inputs: Sequence[str]) -> None:
  """Per residual stream (row) and position (column): the top token read off and its prob."""
  fig, ax, image, note = _cell_grid(
      probs_LxT, top_LxT, lambda r, c: dict(color='white' if probs_LxT[r, c] < 0.55 else 'black'),
      inputs, stream_names, cmap='viridis', vmin=0.0, vmax=1.0)
  ax.set(xlabel='input token (each cell predicts the token after it)',
         ylabel='residual stream after', title=f'Logit lens: top next token per layer{note}')
  fig.colorbar(image, ax=ax, label='probability of the top token', fraction=0.03, pad=0.01)
  _save(fig, path)


def residual_norms(path: str, norms_LxT: np.ndarray, stream_names: Sequence[str]) -> None:
  """L2 norm of the residual stream per layer: mean over positions, range, last position."""
  fig = mpl_figure.Figure(figsize=(6.5, 4))
  ax = fig.subplots()
  x = np.arange(len(stream_names))
  ax.fill_between(x, norms_LxT.min(axis=1), norms_LxT.max(axis=1), alpha=0.2,
                  label='range over positions')
  ax.plot(x, norms_LxT.mean(axis=1), marker='o', label='mean over positions')
  ax.plot(x, norms_LxT[:, -1], marker='.', linestyle='--', label='last position')
  ax.set_xticks(x, stream_names, rotation=45 if len(x) > 12 else 0, fontsize=8)
  ax.set(xlabel='residual stream after', ylabel='L2 norm', title='Residual stream norm per layer')
  ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


def attention(path: str, probs_NxTxS: np.ndarray, labels: Sequence[str],
              kv_heads: Sequence[int], layer: int) -> None:
  """One query x key heatmap per query head of a layer; each names the KV head it shares.

  The heads are tiled into one image on one axes, token labels on the outer edges: separate
  subplots would draw every tick of every head, several times slower for GPT-2's 12 heads.
  """
  num_heads, length, _ = probs_NxTxS.shape
  ncols = min(num_heads, 4)
  nrows = math.ceil(num_heads / ncols)
  side = min(4.5, max(2.6, 0.12 * length))  # inches per head
  gap = max(1, math.ceil(0.35 * length / side))  # cells between heads: room for a title
  stride = length + gap
  canvas = np.full((nrows * stride - gap, ncols * stride - gap), np.nan)
  for n in range(num_heads):
    r, c = divmod(n, ncols)
    canvas[r * stride:r * stride + length, c * stride:c * stride + length] = probs_NxTxS[n]
  fig = mpl_figure.Figure(figsize=(side * ncols + 1.2, side * nrows + 0.8))
  ax = fig.subplots()
  cmap = matplotlib.colormaps['Blues'].with_extremes(bad='white')
  image = ax.imshow(canvas, cmap=cmap, vmin=0.0, vmax=1.0, interpolation='nearest')
  shown = list(range(0, length, math.ceil(length / MAX_TICKS)))
  font = 7 if length <= 24 else 6 if length <= 48 else 5
  ax.set_xticks([c * stride + t for c in range(ncols) for t in shown],
                [labels[t] for _ in range(ncols) for t in shown], rotation=90, fontsize=font)
  ax.set_yticks([r * stride + t for r in range(nrows) for t in shown],
                [labels[t] for _ in range(nrows) for t in shown], fontsize=font)
  ax.tick_params(length=2)
  for spine in ax.spines.values():
    spine.set_visible(False)
  shared = len(set(kv_heads)) < num_heads
  for n in range(num_heads):
    r, c = divmod(n, ncols)
    ax.text(c * stride + length / 2 - 0.5, r * stride - 0.7,
            f'head {n}' + (f' · kv head {kv_heads[n]}' if shared else ''), ha='center',
            va='bottom', fontsize=9)
  ax.set(xlabel='key', ylabel='query')
  ax.set_title(f'Attention, layer {layer} (rows: queries, columns: the keys they attend to)',
               pad=18)
  fig.colorbar(image, ax=ax, label='attention weight', fraction=0.02, pad=0.01)
  _save(fig, path)


def moe_routing(path: str, experts_LxTxA: np.ndarray, gates_LxTxA: np.ndarray,
                inputs: Sequence[str], num_experts: int) -> None:
  """Per layer and token: the experts it was routed to (colour: the first; text: all, the
  more opaque the larger the first choice's gate)."""
  text = [[','.join(str(e) for e in cell) for cell in row] for row in experts_LxTxA]
  fig, ax, image, note = _cell_grid(
      experts_LxTxA[..., 0], text,
      lambda r, c: dict(color='black', alpha=0.4 + 0.6 * float(gates_LxTxA[r, c, 0])), inputs,
      [f'layer {i + 1}' for i in range(len(text))], cmap='tab10' if num_experts <= 10 else 'tab20',
      vmin=-0.5, vmax=num_experts - 0.5)
  ax.set(xlabel='input token', ylabel='MoE layer',
         title=f'Experts each token is routed to (colour: first choice; text: all){note}')
  bar = fig.colorbar(image, ax=ax, label='first-choice expert', fraction=0.03, pad=0.01,
                     ticks=range(num_experts))
  bar.ax.tick_params(labelsize=7)
  _save(fig, path)


def token_similarity(path: str, sims_QxQ: np.ndarray, labels: Sequence[str]) -> None:
  """Cosine similarity between the chosen tokens' embeddings."""
  count = len(labels)
  fig = mpl_figure.Figure(figsize=(2.0 + 0.5 * count, 1.6 + 0.45 * count))
  ax = fig.subplots()
  image = ax.imshow(sims_QxQ, cmap='RdBu_r', vmin=-1.0, vmax=1.0, interpolation='nearest')
  for r in range(count):
    for c in range(count):
      ax.text(c, r, f'{sims_QxQ[r, c]:.2f}', ha='center', va='center', fontsize=7,
              color='white' if abs(sims_QxQ[r, c]) > 0.6 else 'black')
  ax.set_xticks(range(count), labels, rotation=90, fontsize=8)
  ax.set_yticks(range(count), labels, fontsize=8)
  ax.set_title('Cosine similarity of token embeddings', fontsize=10)
  fig.colorbar(image, ax=ax, label='cosine similarity', fraction=0.04, pad=0.02)
  _save(fig, path)


def embedding_pca(path: str, xy_Px2: np.ndarray, labels: Sequence[str],
                  highlight_P: np.ndarray, share_2: np.ndarray, what: str) -> None:
  """2-D PCA scatter of token embeddings, every point labelled; chosen tokens in red."""
  fig = mpl_figure.Figure(figsize=(8, 7))
  ax = fig.subplots()
  plain = ~highlight_P
  ax.scatter(xy_Px2[plain, 0], xy_Px2[plain, 1], s=10, color='tab:blue', alpha=0.6, label=what)
  ax.scatter(xy_Px2[highlight_P, 0], xy_Px2[highlight_P, 1], s=22, color='tab:red',
             label='prompt and --tokens')
  for (x, y), label, chosen in zip(xy_Px2, labels, highlight_P):
    ax.annotate(label, (x, y), xytext=(2, 2), textcoords='offset points',
                fontsize=8 if chosen else 6, color='tab:red' if chosen else 'dimgray')
  ax.set(xlabel=f'PC 1 ({share_2[0]:.0%} of variance)',
         ylabel=f'PC 2 ({share_2[1]:.0%} of variance)',
         title='Token embeddings, first two principal components')
  ax.legend(fontsize=8, loc='best')
  ax.grid(alpha=0.3)
  _save(fig, path)
