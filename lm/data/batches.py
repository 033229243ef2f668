"""Batches as pure functions of (seed, step): resuming needs no replay, hosts need no talk.

Training draws random windows of seq_len + 1 tokens (nanoGPT style) or cuts a packed stream of
whole documents, shuffled per epoch, into rows with segment ids and per-document positions.
Evaluation walks the validation tokens in sequential windows that score each target once.

Shapes: B batch rows, T tokens per row (seq_len), N tokens in the split, D documents,
K evaluation windows.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from typing import Callable, Iterator

import numpy as np

Batch = dict[str, np.ndarray]

_WINDOW_STREAM = 0x57494E  # separates the random streams of the two training modes
_PACKING_STREAM = 0x5041434B


def host_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """This host's rows of a global batch: hosts together see exactly the global batch."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count='
                     f'{process_count}).')
  if batch_size % process_count:
    raise ValueError(f'The batch size {batch_size} must be divisible by the {process_count} '
                     'processes (hosts). Use a multiple of the process count.')
  per_host = batch_size // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)


def _rng(stream: int, seed: int, index: int) -> np.random.Generator:
  if index < 0:
    raise ValueError(f'Steps and epochs start at 0, got {index}.')
  return np.random.default_rng([stream, seed % (1 << 64), index])


def _as_batch(tokens_BxT1: np.ndarray, weights_BxT: np.ndarray, **extra: np.ndarray) -> Batch:
  batch = {'inputs': np.ascontiguousarray(tokens_BxT1[:, :-1], dtype=np.int32),
           'targets': np.ascontiguousarray(tokens_BxT1[:, 1:], dtype=np.int32),
           'weights': weights_BxT.astype(np.float32)}
  batch.update({k: np.ascontiguousarray(v, dtype=np.int32) for k, v in extra.items()})
  return batch


# ---------------------------------------------------------------------------------------------
# Training: random windows.


def window_batch(tokens_N: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int,
                 rows: slice = slice(None)) -> Batch:
  """`batch_size` windows of seq_len + 1 tokens at uniformly random starts (`rows` of them)."""
  num_starts = len(tokens_N) - seq_len
  starts_B = _rng(_WINDOW_STREAM, seed, step).integers(0, num_starts, size=batch_size)[rows]
  index_BxT1 = starts_B[:, None] + np.arange(seq_len + 1)
  tokens_BxT1 = np.asarray(tokens_N[index_BxT1])
  return _as_batch(tokens_BxT1, np.ones((len(starts_B), seq_len), np.float32))


# ---------------------------------------------------------------------------------------------
# Training: packed documents.


@dataclasses.dataclass(frozen=True)
class Documents:
  """Where each document (its tokens and the EOS that ends it) lies in a token array."""

  starts_D: np.ndarray
  lengths_D: np.ndarray

  @classmethod
  def from_tokens(cls, tokens_N: np.ndarray, eos_id: int) -> Documents:
    step, ends = 1 << 24, []
    for begin in range(0, len(tokens_N), step):
      ends.append(np.flatnonzero(np.asarray(tokens_N[begin:begin + step]) == eos_id) + begin + 1)
    ends_D = np.concatenate(ends + [np.zeros(0, np.int64)]).astype(np.int64)
    if not len(ends_D) or ends_D[-1] != len(tokens_N):  # trailing tokens with no EOS after them
      ends_D = np.append(ends_D, len(tokens_N))
    starts_D = np.concatenate([[0], ends_D[:-1]]).astype(np.int64)
    return cls(starts_D=starts_D, lengths_D=ends_D - starts_D)

  @property
  def num_tokens(self) -> int:
    return int(self.lengths_D.sum())


class Packer:
  """Rows of a stream of whole documents, shuffled anew each epoch.

  Epoch e concatenates the documents in a permutation drawn from (seed, e); row q of the epoch
  is stream tokens [q T, q T + T] (rows overlap by the one token that is the last target of a
  row and the first input of the next). Documents run on across rows; the epoch's last
  partial row is dropped. Row r of the whole run is row r % R of epoch r // R.
  """

  def __init__(self, documents: Documents, seed: int, seq_len: int):
    self._docs, self._seed, self._seq_len = documents, seed, seq_len
    self.rows_per_epoch = (documents.num_tokens - 1) // seq_len

  @functools.lru_cache(maxsize=4)
  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's document order and where each of those documents ends in its stream."""
    order_D = _rng(_PACKING_STREAM, self._seed, epoch).permutation(len(self._docs.lengths_D))
    return order_D, np.cumsum(self._docs.lengths_D[order_D])

  def rows(self, rows_R: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token indices, segment ids and positions of rows, each [R, T + 1]."""
    T = self._seq_len  # pylint: disable=invalid-name
    epoch_R, row_in_epoch_R = np.divmod(rows_R, self.rows_per_epoch)
    offsets = np.arange(T + 1)
    index_RxT1 = np.empty((len(rows_R), T + 1), np.int64)
    segment_RxT1 = np.empty_like(index_RxT1)
    position_RxT1 = np.empty_like(index_RxT1)
    for epoch in np.unique(epoch_R):
      mine = epoch_R == epoch
      order_D, ends_D = self._epoch(int(epoch))
      stream_RxT1 = row_in_epoch_R[mine, None] * T + offsets
      doc_RxT1 = np.searchsorted(ends_D, stream_RxT1, side='right')
      doc_start_RxT1 = ends_D[doc_RxT1] - self._docs.lengths_D[order_D[doc_RxT1]]
      index_RxT1[mine] = self._docs.starts_D[order_D[doc_RxT1]] + stream_RxT1 - doc_start_RxT1
      segment_RxT1[mine] = doc_RxT1 - doc_RxT1[:, :1] + 1
      position_RxT1[mine] = stream_RxT1 - np.maximum(doc_start_RxT1, stream_RxT1[:, :1])
    return index_RxT1, segment_RxT1, position_RxT1


def packed_batch(tokens_N: np.ndarray, packer: Packer, step: int, batch_size: int,
                 rows: slice = slice(None)) -> Batch:
  """Rows step*B .. step*B + B - 1 of the packed stream; targets in the next document weigh 0."""
  if step < 0:
    raise ValueError(f'Steps start at 0, got {step}.')
  rows_B = (step * batch_size + np.arange(batch_size))[rows]
  index_BxT1, segment_BxT1, position_BxT1 = packer.rows(rows_B)
  same_document_BxT = segment_BxT1[:, :-1] == segment_BxT1[:, 1:]
  return _as_batch(np.asarray(tokens_N[index_BxT1]), same_document_BxT,
                   segment_ids=segment_BxT1[:, :-1], positions=position_BxT1[:, :-1])


# ---------------------------------------------------------------------------------------------
# Evaluation.


def num_eval_windows(num_tokens: int, seq_len: int, stride: int) -> int:
  """Window 0 scores targets 1..T; each next one moves by `stride` and scores its last ones."""
  return 1 + -(-max(0, num_tokens - 1 - seq_len) // stride)


def eval_batch(tokens_N: np.ndarray, windows_B: np.ndarray, seq_len: int, stride: int,
               pad_id: int, eos_id: int, packing: bool) -> Batch:
  """Windows `windows_B` (ids past the last window give all-padding rows with weight 0).

  Window k holds tokens [k S, k S + T]. Window 0 scores all its targets, later windows only
  their last S (the rest is context that an earlier window scored). With packing, each window
  gets segment ids and positions from the EOS tokens, and targets in a next document weigh 0.
  """
  n = len(tokens_N)
  real_B = windows_B < num_eval_windows(n, seq_len, stride)
  index_BxT1 = (windows_B * stride)[:, None] + np.arange(seq_len + 1)
  valid_BxT1 = real_B[:, None] & (index_BxT1 < n)
  tokens_BxT1 = np.where(valid_BxT1, np.asarray(tokens_N[np.minimum(index_BxT1, n - 1)]), pad_id)
  first_scored_B = np.where(windows_B == 0, 0, seq_len - stride)
  weights_BxT = valid_BxT1[:, 1:] & (np.arange(seq_len) >= first_scored_B[:, None])
  if not packing:
    return _as_batch(tokens_BxT1, weights_BxT)
  starts_BxT1 = np.zeros_like(valid_BxT1)
  starts_BxT1[:, 1:] = (tokens_BxT1[:, :-1] == eos_id) & valid_BxT1[:, :-1]
  segment_BxT1 = np.where(valid_BxT1, np.cumsum(starts_BxT1, axis=1) + 1, 0)
  offsets = np.arange(seq_len + 1)
  last_start_BxT1 = np.maximum.accumulate(np.where(starts_BxT1, offsets, 0), axis=1)
  position_BxT1 = np.where(valid_BxT1, offsets - last_start_BxT1, 0)
  weights_BxT &= segment_BxT1[:, :-1] == segment_BxT1[:, 1:]
  return _as_batch(tokens_BxT1, weights_BxT, segment_ids=segment_BxT1[:, :-1],
                   positions=position_BxT1[:, :-1])


# ---------------------------------------------------------------------------------------------
# Prefetching.


class Prefetcher(Iterator[Batch]):
  """Computes `make_batch(step)` for step = start, start + 1, ... in a background thread.

  Keeps up to `depth` batches ready; an error in the thread is raised by `next`. The thread
  stops on `close`, at the end of a `with` block, or when the iterator is garbage collected.
  """

  def __init__(self, make_batch: Callable[[int], Batch], start_step: int, depth: int):
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    # The thread holds no reference to self, so dropping the iterator stops it.
    self._thread = threading.Thread(
        target=_fill, args=(self._queue, self._stop, make_batch, start_step),
        name='lm-data-prefetch', daemon=True)
    self._thread.start()

  def __next__(self) -> Batch:
    if self._stop.is_set():
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, _Failure):
      self.close()
      raise item.error
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self) -> None:
    self._stop.set()


def _fill(out: queue.Queue, stop: threading.Event, make_batch: Callable[[int], Batch],
          step: int) -> None:
  while not stop.is_set():
    try:
      item = make_batch(step)
    except BaseException as e:  # pylint: disable=broad-except (re-raised by the consumer)
      item = _Failure(e)
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        break
      except queue.Full:
        continue
    if isinstance(item, _Failure):
      return
    step += 1


@dataclasses.dataclass(frozen=True)
class _Failure:
  error: BaseException


def synchronous(make_batch: Callable[[int], Batch], start_step: int) -> Iterator[Batch]:
  """The same batches as `Prefetcher`, computed on demand (data.prefetch = 0)."""
  step = start_step
  while True:
    yield make_batch(step)
    step += 1


def train_iterator(train_batch: Callable[..., Batch], start_step: int, batch_size: int,
                   process_index: int, process_count: int, prefetch: int) -> Iterator[Batch]:
  """Host-local batches train_batch(step, batch_size, process_index, process_count) of steps
  start_step, start_step + 1, ..., `prefetch` of them prepared ahead (0: on demand)."""
  host_rows(batch_size, process_index, process_count)  # fail here, not in a thread
  make_batch = functools.partial(train_batch, batch_size=batch_size,
                                 process_index=process_index, process_count=process_count)
  if prefetch:
    return Prefetcher(make_batch, start_step, prefetch)
  return synchronous(make_batch, start_step)
