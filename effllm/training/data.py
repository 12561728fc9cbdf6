"""Training text for exit training without a hub: the built-in corpora and the model's own answers.

- Corpus windows: random windows of the built-in corpora's train splits (``python-docs``, ``python-code``)
  through :func:`effllm.data.calibration`; any name :func:`effllm.data.load` knows works, so the seeds'
  data sets (``samsum``, ``squad``, ...) serve in the ``paper`` profile and fail offline with
  :class:`effllm.data.DataNotAvailableError`.
- Self-distillation (the model's own greedy answers): the chat-formatted built-in prompts (arithmetic
  questions of the train split, HumanEval prompts) followed by the original model's greedy reply. Training
  on them keeps the exits on the text the model itself generates, which is what an early-exit decoder sees.
  Sequences are concatenated and cut into windows of one length.
- Held-out windows: the validation splits of the same corpora (never trained on).
- Task examples (``task=``, the seeds' fine-tuning data): a task's prompts followed by their reference answers and
  the end of sequence, from its train split, held out from its validation split; one example a row, right-padded
  (causal attention: no position sees the padding after it), with a mask of the positions whose next token is an
  answer token: the loss and the agreement count those only. For T5 (seq2seq, as seed 001 fine-tunes T5-large)
  a row is source and target side by side, each right-padded to half the row: the prompt goes to the encoder
  (padding masked), the reference answer and end of sequence are the decoder's targets.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from effllm import data


def corpus_windows(tokenizer, corpora: tuple[str, ...], n_per_corpus: int, seq_len: int, seed: int,
                   split: str = "train") -> torch.LongTensor:
    """``n_per_corpus`` windows of ``seq_len`` tokens from each corpus: LongTensor [n_corpora·n, seq_len]."""
    if n_per_corpus == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    return torch.cat([data.calibration(name, tokenizer, n_per_corpus, seq_len, seed=seed, split=split)
                      for name in corpora])


def self_distillation_prompts(n_prompts: int, seed: int) -> list[str]:
    """``n_prompts`` built-in prompts, alternating arithmetic questions (train split) and HumanEval prompts,
    each list shuffled with ``seed``."""
    import random

    arithmetic = [r["question"] + " Answer with the steps, then 'The answer is N.'"
                  for r in data.load("arithmetic", "train")]
    code = ["Complete this Python function.\n\n" + r["prompt"] for r in data.load("humaneval", "test")]
    rng = random.Random(seed)
    rng.shuffle(arithmetic)
    rng.shuffle(code)
    prompts: list[str] = []
    for a, c in zip(arithmetic, code, strict=False):
        prompts += [a, c]
    return prompts[:n_prompts]


@torch.no_grad()
def self_distillation_sequences(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                                max_prompt_tokens: int = 256, progress: bool = True) -> list[list[int]]:
    """Each prompt in the chat format followed by the model's greedy answer (HF ``generate``, left-padded
    batches), as token id lists without padding. Decoder-only models only.

    Prompts longer than ``max_prompt_tokens`` are left out and the others are batched by length: on a CPU the
    prompts' prefill, padding included, costs more than the answers (measured: 24 prompts with long HumanEval
    ones took minutes of padding-heavy prefill)."""
    if not prompts or max_new_tokens == 0:
        return []
    device = next(model.parameters()).device
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chats]
    chats = [c for _, c in sorted((n, c) for n, c in zip(lengths, chats, strict=True) if n <= max_prompt_tokens)]
    sequences: list[list[int]] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(chats), batch_size), desc="self-distillation answers", disable=not progress):
            encoded = tokenizer(chats[start:start + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            for row, mask in zip(output, encoded["attention_mask"], strict=True):
                prompt_len = int(mask.shape[0])
                prompt = row[:prompt_len][mask.bool()].tolist()
                answer = [t for t in row[prompt_len:].tolist() if t != tokenizer.pad_token_id]
                sequences.append(prompt + answer)
    finally:
        tokenizer.padding_side = side
    return sequences


def pack(sequences: list[list[int]], seq_len: int) -> torch.LongTensor:
    """Concatenate ``sequences`` and cut them into whole windows of ``seq_len`` tokens [n, seq_len] (the
    incomplete tail is dropped)."""
    flat = [t for sequence in sequences for t in sequence]
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def task_examples(model, tokenizer, task: str, n: int, split: str, max_len: int
                  ) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """``n`` answer examples of ``task`` (several joined by ``+`` take turns) from ``split``: ids [n, q] right-padded
    to the longest (at most ``max_len``) and the mask [n, q] of positions t whose label ids[t + 1] is an answer
    token (prompt format as the model is prompted: :func:`effllm.experiments.prompts.prompt_format`)."""
    from effllm.experiments.prompts import answer_examples, prompt_format

    fmt = prompt_format(model, tokenizer, getattr(model, "name_or_path", ""))
    if getattr(model.config, "is_encoder_decoder", False):
        return seq2seq_examples(tokenizer, task, n, split, max_len, fmt)
    examples = answer_examples(tokenizer, task, n, fmt=fmt, max_len=max_len, split=split)
    if not examples:
        raise ValueError(f"{task} ({split}) gave no answer example within {max_len} tokens")
    length = max(ids.shape[1] for ids, _ in examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(examples), length), pad, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, (example, answer) in enumerate(examples):
        m = example.shape[1]
        ids[row, :m] = example[0]
        mask[row, :m - 1] = answer[0, 1:m]  # position t counts where its label (token t + 1) is an answer token
    return ids, mask


def seq2seq_examples(tokenizer, task: str, n: int, split: str, max_len: int, fmt: str
                     ) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """T5's task examples: ids [n, 2h], the prompt (encoder input) in the first h columns and the reference answer
    with the end of sequence (decoder target) in the last h, each right-padded with the pad id and cut to h =
    ``max_len`` // 2; the mask [n, h] of the target positions that are answer tokens (not padding)."""
    from effllm.experiments.prompts import task_prompts

    half = max_len // 2
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("seq2seq task examples need the tokenizer's pad token (T5's is id 0)")
    rows = []
    for item in task_prompts(tokenizer, task, n, fmt=fmt, split=split):
        target = tokenizer(item.reference or "", add_special_tokens=False).input_ids[:half - 1]
        if target:
            rows.append((item.input_ids[0, :half].tolist(), [*target, tokenizer.eos_token_id]))
    if not rows:
        raise ValueError(f"{task} ({split}) gave no example with a reference answer")
    width = max(max(len(source), len(target)) for source, target in rows)
    ids = torch.full((len(rows), 2 * width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for row, (source, target) in enumerate(rows):
        ids[row, :len(source)] = torch.tensor(source)
        ids[row, width:width + len(target)] = torch.tensor(target)
        mask[row, :len(target)] = True
    return ids, mask
