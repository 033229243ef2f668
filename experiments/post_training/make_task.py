"""Writes the letter-counting task: "how many times does the letter r appear in strawberry?".

  python -m experiments.post_training.make_task OUT_DIR [--words 3000] [--seed 0]

Words are the lowercase alphabetic words of 5-12 letters found in the Python standard library's
source (the embedded corpus, so nothing is downloaded), shuffled with `seed` and split 5:1 into
training and held-out words; "strawberry" is always held out. Each word gets two questions: a
letter it contains and a letter drawn from the alphabet (often a count of 0). Writes to OUT_DIR:

  sft.jsonl          {"prompt", "response"} on training words
  preference.jsonl   {"prompt", "chosen", "rejected"}: the right count against a wrong one
  train_task.jsonl   {"prompt", "answer"} on training words (what SFT saw)
  heldout_task.jsonl {"prompt", "answer"} on held-out words (what it never saw)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import string

from lm.data import corpus

HELD_OUT_ALWAYS = 'strawberry'
_WORD = re.compile(r'\b[a-z]{5,12}\b')


def stdlib_words(limit_files: int = 400) -> list[str]:
  """Distinct words of the first `limit_files` stdlib files, sorted (deterministic)."""
  words = set()
  for document in corpus.stdlib_documents()[:limit_files]:
    words.update(_WORD.findall(''.join(corpus.iter_text(document))))
  words.discard(HELD_OUT_ALWAYS)
  return sorted(words)


def question(word: str, letter: str) -> str:
  return f'How many times does the letter "{letter}" appear in "{word}"?'


def examples(word: str, rng: random.Random) -> list[dict[str, str]]:
  """Two questions about `word`: one of its letters, and any letter."""
  letters = [rng.choice(sorted(set(word))), rng.choice(string.ascii_lowercase)]
  if word == HELD_OUT_ALWAYS:
    letters[0] = 'r'
  out = []
  for letter in dict.fromkeys(letters):
    count = word.count(letter)
    wrong = rng.choice([c for c in (count - 1, count + 1, count + 2) if c >= 0])
    out.append({'prompt': question(word, letter), 'answer': str(count), 'wrong': str(wrong)})
  return out


def write(path: str, rows: list[dict[str, str]]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('out_dir')
  parser.add_argument('--words', type=int, default=3000)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  words = stdlib_words()
  rng.shuffle(words)
  words = words[:args.words - 1]
  split = len(words) * 5 // 6
  train_words, heldout_words = words[:split], words[split:] + [HELD_OUT_ALWAYS]
  train = [e for w in train_words for e in examples(w, rng)]
  heldout = [e for w in heldout_words for e in examples(w, rng)]
  os.makedirs(args.out_dir, exist_ok=True)
  write(os.path.join(args.out_dir, 'sft.jsonl'),
        [{'prompt': e['prompt'], 'response': e['answer']} for e in train])
  write(os.path.join(args.out_dir, 'preference.jsonl'),
        [{'prompt': e['prompt'], 'chosen': e['answer'], 'rejected': e['wrong']} for e in train])
  for name, rows in (('train_task', train), ('heldout_task', heldout)):
    write(os.path.join(args.out_dir, f'{name}.jsonl'),
          [{'prompt': e['prompt'], 'answer': e['answer']} for e in rows])
  print(f'{len(train_words)} training words ({len(train)} questions), {len(heldout_words)} '
        f'held-out words ({len(heldout)} questions) in {args.out_dir}')


if __name__ == '__main__':
  main()
